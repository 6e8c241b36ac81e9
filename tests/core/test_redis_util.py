"""Redis helpers against a real redis-server: reconnects, stream queue with reclaim, idempotent writes."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.asyncio.connection import SSLConnection

from services.core.embedded_redis import EmbeddedRedis
from services.core.net import free_port
from services.core.redis_util import (
    StreamQueue,
    key,
    put_if_absent_many,
    redis_from_url,
    set_once,
    wait_for_redis,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
async def client(redis_server: EmbeddedRedis) -> AsyncIterator[aioredis.Redis]:
    r = redis_from_url(redis_server.url)
    yield r
    await r.aclose()


@pytest.fixture
async def queue(client: aioredis.Redis) -> StreamQueue:
    q = StreamQueue(client, key("t", "tasks"), "generators")
    await q.ensure_group()
    return q


def test_key_namespaces_by_run_id() -> None:
    assert key("run-1", "tasks") == "slime:run-1:tasks"
    assert key("r.2", "uid", 7) == "slime:r.2:uid:7"
    for bad in ("", "a:b", "a b", "*", "-x"):
        with pytest.raises(ValueError, match="--run-id"):
            key(bad, "tasks")
    with pytest.raises(ValueError, match="empty key part"):
        key("run", "")


@pytest.mark.parametrize("url", ["http://127.0.0.1:6379", "127.0.0.1:6379", "redis+sentinel://h:1"])
def test_other_url_schemes_are_rejected_naming_the_url(url: str) -> None:
    with pytest.raises(ValueError, match="--redis-url") as info:
        redis_from_url(url)
    assert url in str(info.value)


def test_errors_never_show_the_password() -> None:
    with pytest.raises(ValueError) as info:
        redis_from_url("http://user:s3cret@host:6379")
    assert "s3cret" not in str(info.value) and "user:***@host" in str(info.value)


def test_rediss_url_makes_a_tls_client() -> None:
    client = redis_from_url("rediss://127.0.0.1:6380/0")
    assert client.connection_pool.connection_class is SSLConnection


async def test_unix_socket_url_async_and_sync(tmp_path: Path) -> None:
    with EmbeddedRedis(unix_socket=tmp_path / "r.sock", dir=tmp_path / "data") as server:
        async_client = redis_from_url(server.url)
        sync_client = redis_from_url(server.url, async_=False)
        await async_client.set("k", "v")
        assert sync_client.get("k") == "v"
        await async_client.aclose()
        sync_client.close()


async def test_same_clients_work_after_the_server_is_killed_and_restarted(
    redis_server: EmbeddedRedis,
) -> None:
    async_client = redis_from_url(redis_server.url)
    sync_client = redis_from_url(redis_server.url, async_=False)
    await async_client.set("before", "1")
    assert sync_client.get("before") == "1"

    redis_server.kill()
    # Issued while the server is down: it must wait out the outage through retries, not fail.
    pending_write = asyncio.create_task(async_client.set("during", "2"))
    await asyncio.sleep(0.4)
    assert not pending_write.done()
    await asyncio.to_thread(redis_server.restart)

    assert await asyncio.wait_for(pending_write, timeout=20) is True
    assert sync_client.get("during") == "2"
    assert await async_client.ping()
    await async_client.aclose()
    sync_client.close()


def test_wait_for_redis(redis_server: EmbeddedRedis) -> None:
    wait_for_redis(redis_server.url, timeout=5)
    nobody = f"redis://127.0.0.1:{free_port()}/0"
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=nobody):
        wait_for_redis(nobody, timeout=0.3)
    assert time.monotonic() - started < 3


async def test_add_read_ack(queue: StreamQueue) -> None:
    ids = await queue.add_many([{"prompt": f"p{i}"} for i in range(3)])
    single = await queue.add({"prompt": "p3", "n": 4})
    entries = await queue.read("w1", count=10)
    assert [e.id for e in entries] == [*ids, single]
    assert entries[3].fields == {"prompt": "p3", "n": "4"}
    assert await queue.pending_count() == 4
    assert await queue.read("w2", count=10) == [], "delivered entries go to one consumer only"

    assert await queue.ack([ids[0], ids[1]]) == 2
    assert await queue.ack([ids[0]]) == 0
    assert await queue.pending_count() == 2
    assert await queue.ack([ids[2], single], delete=True) == 2
    assert await queue.redis.xlen(queue.stream) == 2
    with pytest.raises(ValueError, match="at least one field"):
        await queue.add({})


async def test_a_blocked_consumer_wakes_to_the_whole_batch(
    redis_server: EmbeddedRedis, queue: StreamQueue
) -> None:
    """A worker waiting on the stream gets every entry of one ``add_many`` in its first read (a rollout's groups
    start together), not the first entry alone followed by the rest."""
    await queue.ensure_group()
    reader = redis_from_url(redis_server.url)
    try:
        waiting = StreamQueue(reader, queue.stream, queue.group)
        for _ in range(5):
            read = asyncio.create_task(waiting.read("w", count=100, block_ms=2000))
            # The read is blocked in Redis once the server counts a blocked client.
            for _ in range(200):
                if int((await queue.redis.info("clients"))["blocked_clients"]) == 1:
                    break
                await asyncio.sleep(0.005)
            else:
                pytest.fail("the consumer never blocked on the stream")
            ids = await queue.add_many([{"i": str(i)} for i in range(16)])
            entries = await read
            assert [e.id for e in entries] == ids
            await queue.ack(ids)
    finally:
        await reader.aclose()


async def _wait_blocked(client: aioredis.Redis, n: int) -> None:
    """Until the server counts ``n`` clients blocked (the reads are waiting in Redis)."""
    for _ in range(400):
        if int((await client.info("clients"))["blocked_clients"]) == n:
            return
        await asyncio.sleep(0.005)
    pytest.fail(f"{n} consumers never blocked on the stream")


async def _readers(url: str, queue: StreamQueue, names: str) -> dict[str, StreamQueue]:
    """A registered consumer of ``queue`` on its own connection per letter of ``names``."""
    readers = {}
    for name in names:
        readers[name] = StreamQueue(redis_from_url(url), queue.stream, queue.group)
        await readers[name].register(name)
    return readers


async def test_read_share_alone_takes_the_whole_batch_and_ignores_silent_consumers(
    redis_server: EmbeddedRedis, queue: StreamQueue
) -> None:
    """A lone worker still starts a rollout's groups together; a consumer that stopped reading is not a peer."""
    reader = (await _readers(redis_server.url, queue, "w"))["w"]
    await queue.register("gone")
    await asyncio.sleep(0.5)
    try:
        read = asyncio.create_task(reader.read_share("w", 64, block_ms=2000, live_idle_ms=300))
        await _wait_blocked(queue.redis, 1)
        ids = await queue.add_many([{"i": str(i)} for i in range(16)])
        assert [e.id for e in await read] == ids
        assert await queue.live_consumers(live_idle_ms=300) == ["w"]
        assert sorted(await queue.live_consumers()) == ["gone", "w"]
    finally:
        await reader.redis.aclose()


async def _batch_to_waiting(
    queue: StreamQueue, readers: dict[str, StreamQueue], size: int
) -> list[list[str]]:
    """Add ``size`` entries at once while every reader waits in ``read_share``; the ids each reader took, checked
    to be every entry once."""
    reads = [asyncio.create_task(r.read_share(name, 64, block_ms=2000)) for name, r in readers.items()]
    await _wait_blocked(queue.redis, len(readers))
    ids = await queue.add_many([{"i": str(i)} for i in range(size)])
    taken = [[e.id for e in entries] for entries in await asyncio.gather(*reads)]
    assert sorted(i for t in taken for i in t) == sorted(ids)
    return taken


async def test_read_share_splits_a_batch_between_waiting_consumers(
    redis_server: EmbeddedRedis, queue: StreamQueue
) -> None:
    """Two workers waiting when 16 tasks arrive at once take 8 each (``add_many`` alone would give the first to
    wake all 16); a worker still holding earlier tasks takes fewer."""
    readers = await _readers(redis_server.url, queue, "ab")
    try:
        for _ in range(3):
            a, b = await _batch_to_waiting(queue, readers, 16)
            assert (len(a), len(b)) == (8, 8)
            await queue.ack(a + b)

        # "a" still has 6 tasks in hand: of 10 new ones it takes 2 (8 outstanding each), "b" the other 8.
        await queue.add_many([{"i": str(i)} for i in range(6)])
        assert len(await readers["a"].read("a", 6)) == 6
        a, b = await _batch_to_waiting(queue, readers, 10)
        assert (len(a), len(b)) == (2, 8)
        assert await queue.pending_count() == 6 + 10
    finally:
        for reader in readers.values():
            await reader.redis.aclose()


async def test_entries_added_before_the_group_exists_are_delivered(client: aioredis.Redis) -> None:
    q = StreamQueue(client, "early", "g")
    entry_id = await q.add({"x": "1"})
    await q.ensure_group()
    await q.ensure_group()
    assert [e.id for e in await q.read("c", count=5)] == [entry_id]


async def test_maxlen_trims_the_oldest(client: aioredis.Redis) -> None:
    q = StreamQueue(client, "capped", "g", maxlen=3, approximate=False)
    ids = await q.add_many([{"i": str(i)} for i in range(5)])
    await q.add({"i": "5"})
    await q.ensure_group()
    remaining = [e.id for e in await q.read("c", count=10)]
    assert remaining[:2] == ids[3:] and len(remaining) == 3


async def test_read_without_block_returns_at_once_and_blocking_read_waits_across_slices(
    queue: StreamQueue,
) -> None:
    started = time.monotonic()
    assert await queue.read("c") == []
    assert time.monotonic() - started < 1.0

    async def add_later() -> str:
        await asyncio.sleep(1.3)
        return await queue.add({"late": "yes"})

    adder = asyncio.create_task(add_later())
    started = time.monotonic()
    entries = await queue.read("c", count=1, block_ms=5000)
    elapsed = time.monotonic() - started
    assert [e.id for e in entries] == [await adder]
    assert 1.2 < elapsed < 4.5


async def test_read_recreates_a_group_lost_with_an_unpersisted_restart(
    redis_server: EmbeddedRedis, queue: StreamQueue
) -> None:
    await queue.add({"x": "1"})
    redis_server.kill()
    redis_server.restart()
    assert await queue.read("c", count=5) == []
    new_id = await queue.add({"x": "2"})
    assert [e.id for e in await queue.read("c", count=5)] == [new_id]


CONSUMER_SCRIPT = """
import asyncio, sys
from services.core.redis_util import StreamQueue, redis_from_url

async def main():
    queue = StreamQueue(redis_from_url(sys.argv[1]), sys.argv[2], sys.argv[3])
    entries = await queue.read("doomed", count=3, block_ms=10000)
    print(" ".join(e.id for e in entries), flush=True)
    await asyncio.sleep(120)

asyncio.run(main())
"""


async def test_entries_held_by_a_killed_consumer_are_reclaimed(
    redis_server: EmbeddedRedis, queue: StreamQueue
) -> None:
    ids = await queue.add_many([{"task": str(i)} for i in range(5)])
    consumer = subprocess.Popen(
        [sys.executable, "-c", CONSUMER_SCRIPT, redis_server.url, queue.stream, queue.group],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert consumer.stdout is not None
    line = await asyncio.to_thread(consumer.stdout.readline)
    held = line.split()
    assert held == ids[:3], consumer.stderr.read() if consumer.stderr else ""
    os.kill(consumer.pid, signal.SIGKILL)
    consumer.wait(timeout=10)

    assert await queue.reclaim("survivor", min_idle_ms=60_000) == [], (
        "entries idle less than min_idle_ms stay put"
    )
    await asyncio.sleep(0.3)
    reclaimed = await queue.reclaim("survivor", min_idle_ms=200, count=10)
    assert [e.id for e in reclaimed] == held
    assert [e.fields["task"] for e in reclaimed] == ["0", "1", "2"]

    fresh = await queue.read("survivor", count=10)
    assert [e.id for e in fresh] == ids[3:]
    assert await queue.ack(e.id for e in [*reclaimed, *fresh]) == 5
    assert await queue.pending_count() == 0


async def test_reclaim_honours_count_and_walks_the_pending_list(queue: StreamQueue) -> None:
    ids = await queue.add_many([{"i": str(i)} for i in range(7)])
    await queue.read("dead", count=7)
    first = await queue.reclaim("alive", min_idle_ms=0, count=4)
    assert [e.id for e in first] == ids[:4]
    await queue.ack(e.id for e in first)
    rest = await queue.reclaim("alive", min_idle_ms=0, count=10)
    assert [e.id for e in rest] == ids[4:]


async def test_set_once_writes_once(client: aioredis.Redis) -> None:
    uid_key = key("t", "uid", "sample-1")
    assert await set_once(client, uid_key, "first") is True
    assert await set_once(client, uid_key, "second") is False
    assert await client.get(uid_key) == "first"
    assert await set_once(client, "with-ttl", "v", ttl=30) is True
    assert 0 < await client.pttl("with-ttl") <= 30_000
    with pytest.raises(ValueError, match="ttl"):
        await set_once(client, "bad-ttl", "v", ttl=0)


async def test_put_if_absent_many_is_atomic_per_batch(client: aioredis.Redis) -> None:
    await client.set("k1", "old")
    assert await put_if_absent_many(client, {"k0": "a", "k1": "b", "k2": "c"}, ttl=60) == [True, False, True]
    assert await client.mget("k0", "k1", "k2") == ["a", "old", "c"]
    assert await client.pttl("k1") == -1 and await client.pttl("k2") > 0
    assert await put_if_absent_many(client, {}) == []

    keys = [f"race:{i}" for i in range(20)]
    results = await asyncio.gather(
        *(put_if_absent_many(client, {k: f"writer{w}" for k in keys}) for w in range(8))
    )
    # Each batch runs as one script, so exactly one writer wins every key, and it wins all of them.
    winners = [w for w, flags in enumerate(results) if all(flags)]
    assert len(winners) == 1 and all(not any(flags) for w, flags in enumerate(results) if w != winners[0])
    assert set(await client.mget(*keys)) == {f"writer{winners[0]}"}


async def test_add_once_twice_stores_one_record(queue: StreamQueue) -> None:
    dedup = key("t", "uid", "sample-9")
    first = await queue.add_once({"uid": "sample-9", "reward": "1.0"}, dedup_key=dedup)
    assert first is not None
    assert await queue.add_once({"uid": "sample-9", "reward": "1.0"}, dedup_key=dedup) is None
    assert await queue.redis.xlen(queue.stream) == 1
    assert await queue.redis.get(dedup) == first
    entries = await queue.read("c", count=5)
    assert [(e.id, e.fields) for e in entries] == [(first, {"uid": "sample-9", "reward": "1.0"})]


async def test_add_once_survives_a_restart_with_aof(redis_server_aof: EmbeddedRedis) -> None:
    client = redis_from_url(redis_server_aof.url)
    q = StreamQueue(client, "trajectories", "trainer")
    assert await q.add_once({"uid": "u1"}, dedup_key="uid:u1", ttl=3600) is not None
    redis_server_aof.kill()
    await asyncio.to_thread(redis_server_aof.restart)
    # The script cache is gone after the restart; the client reloads the script and the mark is still there.
    assert await q.add_once({"uid": "u1"}, dedup_key="uid:u1", ttl=3600) is None
    assert await client.xlen("trajectories") == 1
    await client.aclose()
