"""``MegatronTrainer``: the driver's contract of ``TorchTrainer`` (load, compute_log_probs, train_step, save,
export_hf, update_weights, register_state, close) over Megatron ranks, which always run as child processes
(megatron-core's parallel state is per process)."""

from __future__ import annotations

import logging
from typing import Any

from trainer.backends.torch_backend.group import WorkerGroup
from trainer.backends.torch_backend.trainer import TorchTrainer
from trainer.backends.torch_backend.worker import ACTOR

logger = logging.getLogger(__name__)


def require_megatron(prog: str = "slime train") -> None:
    """Exit with the flag at fault unless this machine has a CUDA GPU and megatron-core."""
    import torch

    missing = []
    if not torch.cuda.is_available():
        missing.append("no CUDA GPU is visible")
    try:
        import megatron.core  # noqa: F401
    except ImportError:
        missing.append("megatron-core is not installed (pip install 'slime-rl[megatron]')")
    if missing:
        raise SystemExit(
            f"{prog}: error: --train-backend megatron (the default) needs a CUDA GPU and megatron-core, but "
            f"{' and '.join(missing)}; on this machine use --train-backend fsdp (the torch backend, CPU or GPU)"
        )


def check_parallelism(args: Any) -> None:
    """Raise naming the Megatron flag this backend cannot honour, and what it can."""
    gpus = args.actor_num_gpus_per_node * args.actor_num_nodes
    if args.actor_num_nodes != 1:
        raise ValueError(
            "--train-backend megatron runs its ranks on the trainer's host: set --actor-num-nodes 1"
        )
    for flag, value in (
        ("--pipeline-model-parallel-size", args.pipeline_model_parallel_size),
        ("--context-parallel-size", args.context_parallel_size),
    ):
        if value != 1:
            raise ValueError(
                f"{flag} {value} is not supported by this Megatron backend; use 1 (tensor and data parallelism are)"
            )
    tp = args.tensor_model_parallel_size
    if gpus % (tp * args.expert_model_parallel_size):
        raise ValueError(
            f"--actor-num-gpus-per-node {gpus} must be a multiple of --tensor-model-parallel-size {tp} × "
            f"--expert-model-parallel-size {args.expert_model_parallel_size}"
        )
    if args.use_critic:
        raise ValueError(
            f"--advantage-estimator {args.advantage_estimator} needs a critic, which --train-backend megatron "
            "does not train; use --train-backend fsdp"
        )


class MegatronWorkerGroup(WorkerGroup):
    """The actor's Megatron ranks, one child process per GPU, even for one rank."""

    rank_module = "trainer.backends.megatron_backend.rank"
    single_rank_in_process = False

    def __init__(self, args: Any, *, world_size: int, gpu_offset: int = 0) -> None:
        super().__init__(args, role=ACTOR, world_size=world_size, gpu_offset=gpu_offset)


def actor_gpu_offset(args: Any) -> int:
    """The first GPU of the actor: after the rollout engines' when the host has GPUs for both and they are not
    colocated (an NCCL weight-sync group cannot have two ranks on one GPU), else 0."""
    import torch

    engines = 0 if args.colocate or args.rollout_num_gpus is None else args.rollout_num_gpus
    if engines and torch.cuda.device_count() >= engines + args.actor_num_gpus_per_node:
        return engines
    return 0


class MegatronTrainer(TorchTrainer):
    """The Megatron backend (``--train-backend megatron``), with ``TorchTrainer``'s sequencing, checkpoint layout
    and weight-sync protocol."""

    def __init__(self, args: Any) -> None:
        require_megatron()
        check_parallelism(args)
        super().__init__(args)

    def _actor_group(self, args: Any) -> WorkerGroup:
        return MegatronWorkerGroup(
            args, world_size=args.actor_num_gpus_per_node, gpu_offset=actor_gpu_offset(args)
        )
