"""Durability with real processes: the buffer killed with SIGKILL mid-stream, and Redis killed and restarted
from its append-only file. Every write that was answered 2xx must be there afterwards, exactly once."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from rollout_buffer.server import BufferConfig
from rollout_buffer.store import StoreLimits
from services.core.embedded_redis import EmbeddedRedis
from services.core.net import free_port
from tests.rollout_buffer.helpers import buffer_process, serve, trajectory


@pytest.fixture
def aof_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis(appendonly=True, dir=tmp_path / "redis") as server:
        yield server


@pytest.fixture
def always_fsynced_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    """AOF with ``appendfsync always``: Redis writes each command to the AOF before it replies. Under ``everysec``
    it postpones that write (up to 2 s) while an earlier fsync is still running, yet replies, so a killed Redis
    process can lose acknowledged writes on a slow disk (docs/redis.md, "Persistence")."""
    with EmbeddedRedis(appendonly=True, appendfsync="always", dir=tmp_path / "redis") as server:
        yield server


class Writers:
    """Threads that post items without pause, retrying each until it is answered 2xx, as a careful agent does."""

    def __init__(self, url: str, threads: int = 4):
        self.url = url
        self.acknowledged: set[str] = set()
        self.failures = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _run(self, worker: int) -> None:
        with httpx.Client(base_url=self.url, timeout=5.0, trust_env=False) as client:
            n = 0
            while not self._stop.is_set():
                uid = f"w{worker}-{n}"
                try:
                    response = client.post("/buffer/write", json=trajectory(uid, uid))
                    ok = response.status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok:
                    with self._lock:
                        self.acknowledged.add(uid)
                    n += 1
                else:
                    with self._lock:
                        self.failures += 1
                    time.sleep(0.02)

    def __enter__(self) -> Writers:
        for thread in self._threads:
            thread.start()
        return self

    def wait_for(self, count: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while len(self.acknowledged) < count:
            assert time.monotonic() < deadline, f"only {len(self.acknowledged)} writes acknowledged"
            time.sleep(0.01)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=10)


def _all_uids(url: str) -> list[str]:
    """Every stored item, leased out of the buffer through the v1 API (group size 1: all groups complete)."""
    with httpx.Client(base_url=url, trust_env=False) as client:
        body = client.post("/v1/groups/lease", json={"max_groups": 10_000}).json()
    return [item["uid"] for group in body["groups"] for item in group["items"]]


def test_sigkill_of_the_buffer_mid_stream_loses_no_acknowledged_write(
    aof_redis: EmbeddedRedis, tmp_path: Path
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    buffer = buffer_process(aof_redis.url, port, tmp_path / "buffer.log")
    try:
        with Writers(url) as writers:
            writers.wait_for(150)
            buffer.kill()
            killed_at = len(writers.acknowledged)
            time.sleep(0.3)
            buffer = buffer_process(aof_redis.url, port, tmp_path / "buffer.log")
            writers.wait_for(killed_at + 150)
        assert writers.failures > 0, "the kill should have interrupted some writes"
        stored = _all_uids(url)
    finally:
        buffer.stop()
    assert writers.acknowledged <= set(stored)
    assert len(stored) == len(set(stored)), "an item was stored twice"


def test_redis_killed_and_restarted_from_aof_keeps_everything_acknowledged(
    always_fsynced_redis: EmbeddedRedis, tmp_path: Path
) -> None:
    config = BufferConfig(
        redis_url=always_fsynced_redis.url, limits=StoreLimits(group_size=1), housekeeping_interval_s=0.2
    )
    with serve(config) as buffer:
        with Writers(buffer.url) as writers:
            writers.wait_for(100)
            # Groups leased and acknowledged before the crash must stay gone after it.
            leased = buffer.http.post("/v1/groups/lease", json={"max_groups": 20}).json()["groups"]
            acked = {item["uid"] for group in leased for item in group["items"]}
            ack = buffer.http.post("/v1/groups/ack", json={"lease_ids": [g["lease_id"] for g in leased]})
            assert ack.json()["acked"] == len(leased) == 20
            always_fsynced_redis.kill()
            time.sleep(0.5)
            always_fsynced_redis.start()
            writers.wait_for(len(writers.acknowledged) + 100)
        stored = _all_uids(buffer.url)
        assert writers.acknowledged - acked <= set(stored)
        assert not acked & set(stored), "an acknowledged group came back"
        assert len(stored) == len(set(stored))

        # Every acknowledged write, submitted again, is recognised: stored once.
        items = [trajectory(uid, uid) for uid in sorted(writers.acknowledged)]
        results = []
        for start in range(0, len(items), 500):
            body = buffer.http.post("/v1/trajectories", json={"items": items[start : start + 500]}).json()
            results += [r["status"] for r in body["results"]]
        assert set(results) == {"duplicate"}
