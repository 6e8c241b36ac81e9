"""The grader process pool with real worker processes: results, grader exceptions, hung and crashed workers
killed and replaced, closing, and workers that never outlive a SIGKILLed parent."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from services.reward_model.pool import GraderFailed, GraderPool, GraderTimeout, PoolClosed
from tests.reward_model import grader_fixtures as fx
from tests.reward_model.conftest import is_gone, wait_gone

ROOT = Path(__file__).resolve().parents[2]


async def test_runs_functions_and_reports_grader_exceptions() -> None:
    async with GraderPool(2, 5.0, preload=()) as pool:
        assert len(pool.worker_pids) == 2
        assert await asyncio.gather(*(pool.run(fx.add, i, i) for i in range(20))) == [
            2 * i for i in range(20)
        ]
        with pytest.raises(GraderFailed) as failure:
            await pool.run(fx.fail, "bad label")
        assert failure.value.reason == "grader_error"
        assert "ValueError: bad label" in str(failure.value)
        # An exception inside the grader costs no worker.
        pids = pool.worker_pids
        await pool.run(fx.add, 1, 1)
        assert pool.worker_pids == pids
        assert await pool.run(fx.worker_pid) in pids


async def test_hung_item_times_out_and_its_worker_is_replaced_while_others_finish() -> None:
    async with GraderPool(2, 0.5, preload=()) as pool:
        before = set(pool.worker_pids)
        start = time.perf_counter()
        hung, *others = await asyncio.gather(
            pool.run(fx.hang), *(pool.run(fx.sleep_then, 0.05, i) for i in range(6)), return_exceptions=True
        )
        assert isinstance(hung, GraderTimeout)
        assert others == list(range(6))
        assert time.perf_counter() - start < 3.0
        await asyncio.sleep(0)
        deadline = time.monotonic() + 5
        while len(pool.worker_pids) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        after = set(pool.worker_pids)
        assert len(after) == 2 and len(before - after) == 1
        assert wait_gone(list(before - after))
        assert await pool.run(fx.add, 2, 3) == 5


async def test_timeout_counts_only_the_time_an_item_runs() -> None:
    async with GraderPool(1, 0.6, preload=()) as pool:
        # Three 0.3 s items on one worker take 0.9 s in all, but none runs longer than its timeout.
        assert await asyncio.gather(*(pool.run(fx.sleep_then, 0.3, i) for i in range(3))) == [0, 1, 2]
        with pytest.raises(GraderTimeout):
            await pool.run(fx.sleep_then, 0.3, "late", timeout_s=0.1)


async def test_crashed_worker_is_reported_and_replaced() -> None:
    async with GraderPool(1, 5.0, preload=()) as pool:
        (pid,) = pool.worker_pids
        with pytest.raises(GraderFailed) as failure:
            await pool.run(fx.die, 3)
        assert failure.value.reason == "worker_crashed"
        assert await pool.run(fx.add, 20, 22) == 42
        assert pool.worker_pids != [pid]


async def test_unpicklable_item_is_refused_without_losing_the_worker() -> None:
    async with GraderPool(1, 5.0, preload=()) as pool:
        pids = pool.worker_pids
        with pytest.raises(GraderFailed, match="cannot send"):
            await pool.run(lambda: 1)
        assert await pool.run(fx.add, 1, 2) == 3
        assert pool.worker_pids == pids


async def test_close_kills_workers_and_fails_waiting_items() -> None:
    pool = GraderPool(1, 10.0, preload=())
    await pool.start()
    pids = pool.worker_pids
    busy = asyncio.ensure_future(pool.run(fx.hang))
    waiting = asyncio.ensure_future(pool.run(fx.add, 1, 1))
    await asyncio.sleep(0.2)
    await pool.close()
    with pytest.raises(PoolClosed):
        await waiting
    with pytest.raises(PoolClosed):
        await busy
    assert wait_gone(pids)
    with pytest.raises(PoolClosed):
        await pool.run(fx.add, 1, 1)


def test_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="num_workers"):
        GraderPool(0, 1.0)
    with pytest.raises(ValueError, match="timeout_s"):
        GraderPool(1, 0)


def test_workers_exit_when_their_parent_is_killed() -> None:
    script = textwrap.dedent(
        """
        import asyncio, sys
        from services.reward_model.pool import GraderPool
        from tests.reward_model import grader_fixtures as fx

        async def main():
            pool = GraderPool(2, 60.0, preload=())
            await pool.start()
            asyncio.ensure_future(pool.run(fx.hang))
            asyncio.ensure_future(pool.run(fx.spin_in_c))
            await asyncio.sleep(0.3)
            print(" ".join(map(str, pool.worker_pids)), flush=True)
            await asyncio.sleep(60)

        asyncio.run(main())
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        line = parent.stdout.readline() if parent.stdout else ""
        pids = [int(pid) for pid in line.split()]
        assert len(pids) == 2, line
        assert not any(is_gone(pid) for pid in pids)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(5)
        # One worker is stuck in Python code, the other in C code holding the GIL.
        assert wait_gone(pids, timeout=5.0)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(5)
