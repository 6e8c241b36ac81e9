"""Pushing the trainer's weights into rollout engines over SGLang's update APIs.

Three transports (``transports.py``), picked by deployment: ``distributed`` (a torch.distributed group with every
engine: gloo on CPU, NCCL on GPU), ``tensor`` (colocated engines: shared memory on CPU, CUDA IPC on GPU) and
``disk`` (safetensors on a shared path). ``sync.py`` wraps a push in the protocol around it: new weight version,
pause generation, push, flush caches, resume, publish the version to the router.
"""
