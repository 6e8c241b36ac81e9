"""Where one host's GPUs go when ``slime train`` runs the trainer beside its embedded rollout engines.

With GPUs for all of them and no ``--colocate``, slime's layout: the engines first (engine ``i`` on GPUs
``[i * g, (i + 1) * g)`` for ``--rollout-num-gpus-per-engine g``), the actor after them, the critic after the actor
when there are GPUs for it too. With fewer GPUs (or ``--colocate``) the engines and the trainer share GPU 0 on,
and the weights go to the engines over CUDA IPC: an NCCL group cannot hold two ranks on one GPU.
"""

from __future__ import annotations

import os
from typing import Any


def cuda_devices() -> int:
    """The GPUs this process sees (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _engine_gpus_total(args: Any) -> int:
    """GPUs of this host held by engines apart from the trainer's (none colocated, none for external engines)."""
    if args.colocate or getattr(args, "rollout_external", False) or args.rollout_num_gpus is None:
        return 0
    return args.rollout_num_gpus


def actor_gpu_offset(args: Any, gpus: int | None = None) -> int:
    """The actor's first GPU: after the rollout engines' when the host has GPUs for both and they are not
    colocated, else 0."""
    gpus = cuda_devices() if gpus is None else gpus
    engines = _engine_gpus_total(args)
    if engines and gpus >= engines + args.actor_num_gpus_per_node:
        return engines
    return 0


def critic_gpu_offset(args: Any, gpus: int | None = None) -> int:
    """The critic's first GPU: after the actor's when the host has enough, else the actor's."""
    gpus = cuda_devices() if gpus is None else gpus
    actor = actor_gpu_offset(args, gpus)
    after = actor + args.actor_num_gpus_per_node
    return after if gpus >= after + args.critic_num_gpus_per_node else actor


def engines_have_own_gpus(args: Any, gpus: int | None = None) -> bool:
    """Whether the embedded engines run on GPUs of their own (slime's non-colocated layout fits the host)."""
    gpus = cuda_devices() if gpus is None else gpus
    return gpus > 0 and actor_gpu_offset(args, gpus) > 0


def engines_share_trainer_gpus(args: Any, gpus: int | None = None) -> bool:
    """Whether embedded engines that are not ``--colocate``d still land on the trainer's GPUs (too few GPUs)."""
    gpus = cuda_devices() if gpus is None else gpus
    return gpus > 0 and _engine_gpus_total(args) > 0 and not engines_have_own_gpus(args, gpus)


def engine_cuda_visible_devices(args: Any, index: int, gpus: int | None = None) -> str | None:
    """``CUDA_VISIBLE_DEVICES`` for embedded engine ``index`` when the engines have GPUs of their own (its GPUs,
    through this process's own ``CUDA_VISIBLE_DEVICES``), else None: the engine keeps this process's view."""
    gpus = cuda_devices() if gpus is None else gpus
    if not engines_have_own_gpus(args, gpus):
        return None
    per_engine = args.rollout_num_gpus_per_engine
    ordinals = range(index * per_engine, (index + 1) * per_engine)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    names = [v.strip() for v in visible.split(",")] if visible else [str(i) for i in range(gpus)]
    return ",".join(names[i] for i in ordinals)
