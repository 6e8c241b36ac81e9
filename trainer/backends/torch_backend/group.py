"""A group of training ranks driven from the trainer's process: one ``TrainWorker`` in-process, or one child
process per rank (``python -m trainer.backends.torch_backend.rank``), each answering method calls sent over a
private socket pair; every rank runs every call, like an SPMD program.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import subprocess
import sys
import time
from multiprocessing.connection import Connection
from typing import Any

from services.core.child import wrap
from services.core.net import free_port
from trainer.backends.torch_backend.worker import DistInit, TrainWorker

logger = logging.getLogger(__name__)

SHUTDOWN = "__shutdown__"
_POLL_S = 0.5
_START_TIMEOUT_S = 600.0
_SHUTDOWN_TIMEOUT_S = 30.0


class WorkerError(RuntimeError):
    """A training rank failed; the message carries the rank's traceback."""


class WorkerGroup:
    """The ranks of the actor or the critic. ``call`` runs a ``TrainWorker`` method on every rank and returns
    the per-rank results in rank order."""

    # The module each rank process runs, and whether a single rank may run in the trainer's own process.
    rank_module = "trainer.backends.torch_backend.rank"
    single_rank_in_process = True

    def __init__(self, args: Any, *, role: str, world_size: int, gpu_offset: int = 0) -> None:
        self.role = role
        self.world_size = world_size
        self._local: TrainWorker | None = None
        self._procs: list[subprocess.Popen] = []
        self._conns: list[Connection] = []
        dist_init = DistInit(
            master_addr="127.0.0.1",
            master_port=free_port(),
            timeout_minutes=args.distributed_timeout_minutes,
            gpu_offset=gpu_offset,
        )
        if world_size == 1 and self.single_rank_in_process:
            self._local = TrainWorker(args, role=role, rank=0, world_size=1, dist_init=dist_init)
            return
        try:
            self._spawn(args, dist_init)
        except BaseException:
            self.close()
            raise
        logger.info("%s group: %d ranks started", role, world_size)

    def _spawn(self, args: Any, dist_init: DistInit) -> None:
        log_level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
        for _ in range(self.world_size):
            ours, theirs = socket.socketpair()
            with theirs:
                argv = [sys.executable, "-m", self.rank_module, str(theirs.fileno())]
                self._procs.append(subprocess.Popen(wrap(argv), pass_fds=[theirs.fileno()]))
            self._conns.append(Connection(ours.detach()))
        for rank, conn in enumerate(self._conns):
            conn.send((args, self.role, rank, self.world_size, dist_init, log_level))
        self._collect(timeout_s=_START_TIMEOUT_S)

    def call(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        if self._local is not None:
            return [getattr(self._local, method)(*args, **kwargs)]
        for conn in self._conns:
            conn.send((method, args, kwargs))
        return self._collect()

    def _collect(self, timeout_s: float | None = None) -> list[Any]:
        results: list[Any] = [None] * self.world_size
        errors = []
        start = time.monotonic()
        for rank, (conn, proc) in enumerate(zip(self._conns, self._procs, strict=True)):
            while not conn.poll(_POLL_S):
                if proc.poll() is not None:
                    break
                if timeout_s is not None and time.monotonic() - start > timeout_s:
                    errors.append(f"{self.role} rank {rank} did not answer within {timeout_s:g}s")
                    break
            else:
                try:
                    status, payload = conn.recv()
                except EOFError:
                    status, payload = "error", f"connection lost (exit code {proc.poll()})"
                if status == "error":
                    errors.append(f"{self.role} rank {rank}: {payload}")
                else:
                    results[rank] = payload
                continue
            if proc.poll() is not None:
                errors.append(f"{self.role} rank {rank} died (exit code {proc.returncode})")
        if errors:
            raise WorkerError("\n".join(errors))
        return results

    def close(self) -> None:
        if self._local is not None:
            self._local.shutdown()
            self._local = None
            return
        for conn, proc in zip(self._conns, self._procs, strict=False):
            if proc.poll() is None:
                try:
                    conn.send((SHUTDOWN, (), {}))
                except OSError:
                    continue
        for conn, proc in zip(self._conns, self._procs, strict=False):
            # The rank acknowledges once its process groups are down, then exits at once.
            if proc.poll() is None and conn.poll(_SHUTDOWN_TIMEOUT_S):
                with contextlib.suppress(EOFError):
                    conn.recv()
            try:
                proc.wait(timeout=_SHUTDOWN_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                logger.warning("%s: rank process %d did not stop, killing it", self.role, proc.pid)
                proc.kill()
                proc.wait(timeout=10)
        for conn in self._conns:
            conn.close()
        self._procs.clear()
        self._conns.clear()
