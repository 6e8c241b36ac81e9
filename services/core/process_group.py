"""The weight-update process group both sides of a weight sync join (the trainer as rank 0, engines after it), and
the training ranks' backend choice."""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist


def init_weight_update_group(
    *,
    master_address: str,
    master_port: int,
    rank: int,
    world_size: int,
    group_name: str,
    backend: str,
    timeout_s: float,
) -> dist.ProcessGroup:
    """Join (or, at rank 0, host) a process group outside the default world, keyed by ``group_name``.

    This is the construction SGLang's engines and slime's trainer use (TCP rendezvous at the master, a store
    prefixed with the group name, torch's process-group helper), so either side can be SGLang, slime or this
    project. torch has no public API for a second world-sized group that is not the default one.
    """
    from torch.distributed.distributed_c10d import (
        Backend,
        PrefixStore,
        _new_process_group_helper,
        _world,
        rendezvous,
    )

    timeout = timedelta(seconds=timeout_s)
    store, rank, world_size = next(
        rendezvous(f"tcp://{master_address}:{master_port}", rank, world_size, timeout=timeout)
    )
    store.set_timeout(timeout)
    group, _ = _new_process_group_helper(
        world_size,
        rank,
        [],
        Backend(backend),
        PrefixStore(group_name, store),
        group_name=group_name,
        backend_options=None,
        timeout=timeout,
    )
    _world.pg_group_ranks[group] = {i: i for i in range(world_size)}
    return group


# torch.distributed's backends (the ones a build may have).
DISTRIBUTED_BACKENDS = ("nccl", "gloo", "mpi", "ucc", "xccl")


def training_backend(requested: str, device: torch.device) -> str:
    """The training ranks' torch.distributed backend for ``--distributed-backend``: as given, except that NCCL (the
    default) becomes gloo on CPU ranks, where NCCL cannot run."""
    backend = (requested or "nccl").lower()
    if backend not in DISTRIBUTED_BACKENDS:
        raise ValueError(
            f"--distributed-backend {requested!r}: not a torch.distributed backend "
            f"(one of {', '.join(DISTRIBUTED_BACKENDS)})"
        )
    if backend == "nccl" and device.type != "cuda":
        return "gloo"
    return backend
