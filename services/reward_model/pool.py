"""A process pool for CPU-bound graders with a per-item timeout: a hung or crashed worker is killed and replaced.

``concurrent.futures.ProcessPoolExecutor`` cannot cancel a running call, and a worker stuck inside sympy's C code
never returns, so each worker here is a process of its own that the pool SIGKILLs when its item overruns.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import importlib
import logging
import multiprocessing
import os
import pickle
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing import forkserver
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

logger = logging.getLogger(__name__)

DEFAULT_PRELOAD = ("sympy", "sympy.parsing.sympy_parser", "services.reward_model.graders")
WORKER_START_TIMEOUT_S = 60.0
_ORPHAN_CHECK_INTERVAL_S = 1.0
_PR_SET_PDEATHSIG = 1

POOL_RESTARTS = Counter(
    "slime_reward_model_pool_worker_restarts_total",
    "Grader worker processes killed and replaced, by reason (timeout, crashed, cancelled).",
    ["reason"],
)
POOL_BUSY = Gauge("slime_reward_model_pool_busy_workers", "Grader worker processes running an item now.")
GRADE_SECONDS = Histogram(
    "slime_reward_model_grade_seconds",
    "Time one item spent inside a grader worker (the grading itself, without queueing or transport).",
    buckets=(0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
# CPU next to wall time: a wall time well above the CPU time means the workers wait for a core.
GRADE_CPU_SECONDS = Counter(
    "slime_reward_model_grade_cpu_seconds_total", "CPU time grader workers spent inside graders."
)


class GraderTimeout(Exception):
    """The item ran past its timeout; its worker was killed."""


class GraderFailed(Exception):
    """The grader raised, or its worker died; ``reason`` is a short machine-readable cause."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class PoolClosed(RuntimeError):
    """The pool was closed while the item waited for a worker."""


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _die_with_parent() -> None:
    """Have the kernel SIGKILL this worker when its parent (the forkserver, which exits with the service) dies.

    This covers a grader stuck in C code that holds the GIL, where no thread of the worker can run (Linux only).
    """
    # multiprocessing hands every forkserver child the write end of the pipe whose closing tells the forkserver
    # that the service is gone. A worker stuck in C would hold it open forever, keeping the forkserver (and so
    # itself) alive; workers start no processes of their own, so they drop it.
    alive_fd = getattr(getattr(forkserver, "_forkserver", None), "_forkserver_alive_fd", None)
    if isinstance(alive_fd, int):
        with contextlib.suppress(OSError):
            os.close(alive_fd)
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    # The parent may have died before the request; then no signal would ever come.
    if os.getppid() != parent:
        os._exit(1)


def _exit_when_orphaned(parent_pid: int) -> None:
    # A worker stuck in a grader never reads its pipe again, so it cannot see the service go; this thread can,
    # as long as the grader releases the GIL now and then (pure-Python sympy does), on any platform.
    while True:
        time.sleep(_ORPHAN_CHECK_INTERVAL_S)
        try:
            os.kill(parent_pid, 0)
        except ProcessLookupError:
            os._exit(0)


def _worker_main(conn: Connection, parent_pid: int, preload: Sequence[str]) -> None:
    # Ctrl-C reaches the whole process group; shutting the workers down is the parent's job.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    for module in preload:
        importlib.import_module(module)
    threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), daemon=True).start()
    conn.send(("ready", os.getpid()))
    while True:
        try:
            fn, args = conn.recv()
        except (EOFError, OSError):
            return
        start, start_cpu = time.perf_counter(), time.process_time()
        try:
            status, payload = "ok", fn(*args)
        except Exception as exc:
            status, payload = "error", f"{type(exc).__name__}: {exc}"
        wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
        try:
            conn.send((status, payload, wall, cpu))
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            # Pickling fails before anything is written, so the pipe still carries whole messages only.
            conn.send(("error", f"the grader's result cannot be sent back: {exc}", wall, cpu))


@dataclass(eq=False)
class _Worker:
    process: BaseProcess
    conn: Connection
    # Set while an item's reply is awaited, so that killing the worker can fail that wait.
    pending: asyncio.Future[None] | None = None
    dead: bool = False

    @property
    def pid(self) -> int | None:
        return self.process.pid


class GraderPool:
    """``num_workers`` grader processes; ``await pool.run(fn, *args)`` runs ``fn`` in one with a timeout.

    ``fn`` must be importable by reference (a module-level function). Waiting for a free worker does not count
    against the timeout; only the time the item runs does.
    """

    def __init__(
        self,
        num_workers: int,
        timeout_s: float,
        *,
        preload: Sequence[str] = DEFAULT_PRELOAD,
        start_method: str = "forkserver",
    ):
        if num_workers < 1:
            raise ValueError(f"num_workers must be at least 1, got {num_workers}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self.num_workers = num_workers
        self.timeout_s = timeout_s
        self._preload = tuple(preload)
        self._ctx = multiprocessing.get_context(start_method)
        if start_method == "forkserver":
            # Replacement workers then fork from a server that already imported sympy: ready in a fraction of a
            # second. (A child still runs the parent's main module again, as multiprocessing does; the `slime`
            # console script is light, `python -m` of a heavy module is not.)
            self._ctx.set_forkserver_preload(list(self._preload))
        # None in the queue tells a waiting caller that the pool closed.
        self._idle: asyncio.Queue[_Worker | None] = asyncio.Queue()
        self._waiting = 0
        self._workers: set[_Worker] = set()
        self._replacing: set[asyncio.Task[None]] = set()
        self._closed = False
        self._started = False

    @property
    def worker_pids(self) -> list[int]:
        return sorted(w.pid for w in self._workers if w.pid is not None)

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        workers = await asyncio.gather(*(self._spawn() for _ in range(self.num_workers)))
        for worker in workers:
            self._idle.put_nowait(worker)
        logger.info(
            "grader pool up: %d workers %s, timeout %.3gs", self.num_workers, self.worker_pids, self.timeout_s
        )

    async def __aenter__(self) -> GraderPool:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def run(self, fn: Callable[..., Any], *args: Any, timeout_s: float | None = None) -> Any:
        """Run ``fn(*args)`` in a worker; raise ``GraderTimeout`` or ``GraderFailed`` when it does not return."""
        if not self._started:
            await self.start()
        worker = await self._acquire()
        timeout = self.timeout_s if timeout_s is None else timeout_s
        try:
            worker.conn.send((fn, args))
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            # Pickling happens before anything is written, so the worker never saw the item and stays usable.
            self._idle.put_nowait(worker)
            raise GraderFailed("grader_error", f"cannot send the item to a grader worker: {exc}") from exc
        POOL_BUSY.inc()
        try:
            async with asyncio.timeout(timeout):
                reply = await self._receive(worker)
        except TimeoutError:
            self._replace(worker, "timeout")
            raise GraderTimeout(f"grader did not finish within {timeout:g}s; its worker was killed") from None
        except PoolClosed:
            raise
        except (EOFError, OSError) as exc:
            self._replace(worker, "crashed")
            raise GraderFailed("worker_crashed", f"grader worker pid {worker.pid} died: {exc!r}") from None
        except BaseException:
            # Cancelled mid-item: the worker may still be busy with it, so it cannot go back as idle.
            self._replace(worker, "cancelled")
            raise
        finally:
            POOL_BUSY.dec()
        self._idle.put_nowait(worker)
        status, payload, seconds, cpu_seconds = reply
        GRADE_SECONDS.observe(seconds)
        GRADE_CPU_SECONDS.inc(cpu_seconds)
        if status == "error":
            raise GraderFailed("grader_error", payload)
        return payload

    async def _acquire(self) -> _Worker:
        if self._closed:
            raise PoolClosed("grader pool is closed")
        self._waiting += 1
        try:
            worker = await self._idle.get()
        finally:
            self._waiting -= 1
        if worker is None:
            raise PoolClosed("grader pool is closed")
        return worker

    async def _receive(self, worker: _Worker) -> Any:
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()
        fd = worker.conn.fileno()
        loop.add_reader(fd, _resolve, ready)
        worker.pending = ready
        try:
            await ready
        finally:
            worker.pending = None
            # A killed worker's fd is closed and its number may already belong to another socket of this loop.
            if not worker.dead:
                loop.remove_reader(fd)
        # Readable means the worker wrote its whole (small) reply or died; recv() does not block past that.
        return worker.conn.recv()

    async def _spawn(self) -> _Worker:
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(
            target=_worker_main,
            args=(child_conn, os.getpid(), self._preload),
            name="slime-reward-grader",
            daemon=True,
        )
        await asyncio.to_thread(process.start)
        child_conn.close()
        worker = _Worker(process, parent_conn)
        self._workers.add(worker)
        try:
            message = await asyncio.wait_for(self._receive(worker), WORKER_START_TIMEOUT_S)
        except (TimeoutError, EOFError, OSError) as exc:
            await self._kill(worker)
            raise RuntimeError(f"grader worker did not start: {exc!r}") from exc
        if message[0] != "ready":
            await self._kill(worker)
            raise RuntimeError(f"grader worker sent {message!r} instead of ready")
        return worker

    def _replace(self, worker: _Worker, reason: str) -> None:
        POOL_RESTARTS.labels(reason).inc()
        logger.warning("replacing grader worker pid %s (%s)", worker.pid, reason)
        task = asyncio.get_running_loop().create_task(self._replace_task(worker))
        self._replacing.add(task)
        task.add_done_callback(self._replacing.discard)

    async def _replace_task(self, worker: _Worker) -> None:
        await self._kill(worker)
        delay = 0.5
        while not self._closed:
            try:
                replacement = await self._spawn()
                break
            except Exception:
                # Items wait for workers rather than fail, so a pool that cannot refill must keep trying.
                logger.exception("could not start a replacement grader worker; retrying in %.1fs", delay)
                await asyncio.sleep(delay)
                delay = min(2 * delay, 30.0)
        else:
            return
        if self._closed:
            await self._kill(replacement)
            return
        logger.info("grader worker pid %s replaced by pid %s", worker.pid, replacement.pid)
        self._idle.put_nowait(replacement)

    async def _kill(self, worker: _Worker) -> None:
        self._workers.discard(worker)
        if not worker.dead:
            worker.dead = True
            if worker.pending is not None:
                asyncio.get_running_loop().remove_reader(worker.conn.fileno())
                if not worker.pending.done():
                    worker.pending.set_exception(PoolClosed("grader pool closed while the item ran"))
            with contextlib.suppress(OSError):
                worker.conn.close()
        if worker.process.is_alive():
            worker.process.kill()
        await asyncio.to_thread(worker.process.join, 5.0)

    async def close(self) -> None:
        """Kill every worker; items still waiting for one get ``PoolClosed``."""
        if self._closed:
            return
        self._closed = True
        for task in list(self._replacing):
            task.cancel()
        await asyncio.gather(*self._replacing, return_exceptions=True)
        await asyncio.gather(*(self._kill(worker) for worker in list(self._workers)))
        for _ in range(self._waiting):
            self._idle.put_nowait(None)
        logger.info("grader pool closed")
