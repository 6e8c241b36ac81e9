"""CUDA memory snapshots of the training ranks: ``--record-memory-history``, ``--memory-snapshot-dir`` and
``--memory-snapshot-path``, as slime's actor does.

With ``--record-memory-history`` every training rank records the CUDA caching allocator's history from its start
(``torch.cuda.memory._record_memory_history``) and, when an allocation fails, dumps a snapshot to
``<--memory-snapshot-dir>/oom_rank-<rank>_<--memory-snapshot-path>`` (slime's OOM observer). Beyond slime, each
rank also dumps ``rank-<rank>_<--memory-snapshot-path>`` when it shuts down, so a run that did not run out of
memory leaves a snapshot too. Open them at https://pytorch.org/memory_viz. The snapshots are of CUDA memory
only: on a machine without CUDA the driver says so and nothing is recorded.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

DEFAULT_DIR = "."
DEFAULT_PATH = "snapshot.pickle"  # Megatron's --memory-snapshot-path default
MAX_ENTRIES = 100_000


def recording(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "record_memory_history", False))


def snapshot_name(args: argparse.Namespace) -> str:
    name = str(getattr(args, "memory_snapshot_path", None) or DEFAULT_PATH)
    if "/" in name:
        raise ValueError(
            f"--memory-snapshot-path is a file name inside --memory-snapshot-dir (as in slime), got {name!r}; "
            "put the directory in --memory-snapshot-dir"
        )
    return name


def check_flags(args: argparse.Namespace, *, cuda_available: bool) -> None:
    """Validate the flags in the driver, and say why nothing will be written when nothing will be."""
    directory = Path(args.memory_snapshot_dir)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"--memory-snapshot-dir {args.memory_snapshot_dir} exists and is not a directory")
    if not recording(args):
        if args.memory_snapshot_dir != DEFAULT_DIR:
            logger.warning(
                "--memory-snapshot-dir %s has no effect without --record-memory-history (slime's switch for "
                "CUDA memory snapshots); nothing will be written there",
                args.memory_snapshot_dir,
            )
        return
    snapshot_name(args)
    if not cuda_available:
        logger.warning(
            "--record-memory-history records CUDA memory snapshots and needs a CUDA GPU; this run trains on "
            "CPU, so no snapshot is written to --memory-snapshot-dir %s",
            args.memory_snapshot_dir,
        )


class MemoryHistory:
    """One training rank's CUDA allocator history: started with the rank, dumped on OOM and at shutdown."""

    def __init__(self, directory: Path, name: str, rank: int, role: str, device: torch.device):
        self.directory = directory
        self.prefix = f"rank-{rank}" if role == "actor" else f"{role}-rank-{rank}"
        self.name = name
        self.device = device

    @classmethod
    def start(
        cls, args: argparse.Namespace, *, rank: int, role: str, device: torch.device
    ) -> MemoryHistory | None:
        """Start recording on a CUDA rank with ``--record-memory-history``; None otherwise (the driver has said
        why when the flag is on)."""
        if not recording(args) or device.type != "cuda":
            return None
        history = cls(Path(args.memory_snapshot_dir), snapshot_name(args), rank, role, device)
        history.directory.mkdir(parents=True, exist_ok=True)
        torch.cuda.memory._record_memory_history(max_entries=MAX_ENTRIES, stacks="all", device=device)
        torch._C._cuda_attach_out_of_memory_observer(history._on_oom)
        logger.info("recording CUDA memory history; snapshots go to %s", history.directory)
        return history

    def path(self, kind: str = "") -> Path:
        return self.directory / f"{kind}{self.prefix}_{self.name}"

    def _on_oom(self, device: int, alloc: int, device_alloc: int, device_free: int) -> Any:
        path = self.path("oom_")
        logger.error(
            "CUDA out of memory on device %d (asked %d bytes, %d allocated, %d free); memory snapshot: %s",
            device,
            alloc,
            device_alloc,
            device_free,
            path,
        )
        torch.cuda.memory._dump_snapshot(str(path))

    def stop(self) -> Path:
        """Dump the snapshot of the whole run and stop recording."""
        path = self.path()
        torch.cuda.memory._dump_snapshot(str(path))
        torch.cuda.memory._record_memory_history(enabled=None, device=self.device)
        logger.info("CUDA memory snapshot written to %s", path)
        return path
