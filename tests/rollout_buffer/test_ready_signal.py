"""Waiting reads wake on the store's ready signal: a group sealed by another process reaches a waiting FetchGroups
or v1 lease at once, not at the next re-check; a signal lost while Redis restarts only delays a group; shutdown
leaves no task or subscription behind."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from protos import slime_pb2_grpc
from rollout_buffer.client import BufferClient, BufferFetchError, FetchedGroup
from rollout_buffer.generators import GeneratorRegistry
from rollout_buffer.grpc_service import BufferServicer
from rollout_buffer.server import BufferConfig
from rollout_buffer.service import BufferService, ServiceSettings
from rollout_buffer.store import QUEUE_EVAL, QUEUE_TRAIN, READY_RECHECK_S, BufferStore, StoreLimits
from services.core.embedded_redis import EmbeddedRedis
from services.core.grpc_util import create_grpc_server
from services.core.net import free_port
from services.core.redis_util import redis_from_url
from tests.rollout_buffer.helpers import ServedBuffer, buffer_process, new_item, serve, trajectory

# A waiter re-checks the store every READY_RECHECK_S (1 s) on its own; a signalled group comes much sooner.
PROMPT_S = 0.25


@pytest.fixture
def writer(redis_server: EmbeddedRedis, tmp_path: Path) -> Iterator[httpx.Client]:
    """Another buffer process on the same Redis, as with --http-workers: the writes of a test go through it."""
    port = free_port()
    process = buffer_process(redis_server.url, port, tmp_path / "writer.log", group_size=2)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", trust_env=False, timeout=10) as client:
            yield client
    finally:
        process.stop()


@contextlib.asynccontextmanager
async def grpc_buffer(redis_url: str) -> AsyncIterator[tuple[BufferStore, str]]:
    """The gRPC BufferService on loopback in this event loop, so that a test can watch its store."""
    redis_client = redis_from_url(redis_url)
    store = BufferStore(redis_client, StoreLimits(group_size=2), redis_url=redis_url)
    port = free_port()
    server = create_grpc_server(port)
    service = BufferService(store, GeneratorRegistry(), ServiceSettings())
    slime_pb2_grpc.add_BufferServiceServicer_to_server(BufferServicer(service), server)
    await server.start()
    try:
        yield store, f"127.0.0.1:{port}"
    finally:
        await server.stop(grace=1.0)
        await store.aclose()
        await redis_client.aclose()


async def _subscribers(redis_client: aioredis.Redis) -> int:
    """The connections subscribed to anything, as Redis counts them."""
    with contextlib.suppress(RedisError):
        return len(await redis_client.client_list(_type="pubsub"))
    return 0


async def _until_subscribers(redis_client: aioredis.Redis, count: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while await _subscribers(redis_client) != count:
        assert time.monotonic() < deadline, f"not {count} subscribers after {timeout}s"
        await asyncio.sleep(0.02)


async def _write(writer: httpx.Client, uid: str, instance_id: str) -> None:
    """One trajectory item through the writer process, answered 2xx."""
    response = await asyncio.to_thread(writer.post, "/buffer/write", json=trajectory(uid, instance_id))
    response.raise_for_status()


async def _arrival_after_write(fetch: asyncio.Task, write: Callable[[], Awaitable[Any]]) -> tuple[float, Any]:
    """Seconds from the end of ``write`` (awaited while ``fetch`` waits) to ``fetch``'s result, and the result."""
    await asyncio.sleep(0.3)
    assert not fetch.done(), "the fetch should be waiting for the group"
    await write()
    written = time.monotonic()
    result = await fetch
    return time.monotonic() - written, result


async def test_a_waiting_fetch_groups_gets_a_group_sealed_by_another_process_at_once(
    buffer: ServedBuffer, writer: httpx.Client
) -> None:
    client = BufferClient(grpc_addr=buffer.grpc_addr, wait_seconds=10)
    try:
        # Three in a row: one could come at the re-check by chance (a 1 in 4 chance each).
        for n in range(3):
            await _write(writer, f"a{n}", f"g{n}")
            fetch = asyncio.create_task(client.fetch(1))
            elapsed, groups = await _arrival_after_write(fetch, partial(_write, writer, f"b{n}", f"g{n}"))
            assert [group.group_id for group in groups] == [f"g{n}"]
            assert elapsed < PROMPT_S, f"group {n} came {elapsed:.3f}s after its write"
            await client.ack([group.lease_id for group in groups])
    finally:
        await client.aclose()


async def test_a_waiting_v1_lease_gets_a_group_sealed_by_another_process_at_once(
    buffer: ServedBuffer, writer: httpx.Client
) -> None:
    for n in range(3):
        await _write(writer, f"a{n}", f"g{n}")
        body = {"max_groups": 5, "wait_seconds": 10}
        lease = asyncio.create_task(asyncio.to_thread(buffer.http.post, "/v1/groups/lease", json=body))
        elapsed, response = await _arrival_after_write(lease, partial(_write, writer, f"b{n}", f"g{n}"))
        assert [group["instance_id"] for group in response.json()["groups"]] == [f"g{n}"]
        assert elapsed < PROMPT_S, f"group {n} came {elapsed:.3f}s after its write"


async def test_groups_back_from_an_expired_or_released_lease_reach_a_waiting_fetch(
    redis_server: EmbeddedRedis, redis_client: aioredis.Redis
) -> None:
    other = BufferStore(redis_client, StoreLimits(group_size=1))
    async with grpc_buffer(redis_server.url) as (_, addr):
        client = BufferClient(grpc_addr=addr, wait_seconds=10)
        try:
            # A reader that never acks: its lease runs out after 0.5 s, and nothing is published then.
            await other.write("default", [new_item("a", "g1")])
            assert len((await other.lease("default", 1, lease_seconds=0.5)).groups) == 1
            started = time.monotonic()
            [group] = await client.fetch(1)
            elapsed = time.monotonic() - started
            assert group.group_id == "g1" and 0.45 < elapsed < 0.5 + PROMPT_S, elapsed
            assert await client.ack([group.lease_id]) == 1

            # A restarted trainer releases its predecessor's leases (trainer/run.py) from its own process.
            await other.write("default", [new_item("b", "g2")])
            assert len((await other.lease("default", 1, lease_seconds=300)).groups) == 1
            fetch = asyncio.create_task(client.fetch(1))

            async def release() -> None:
                assert await other.release_leases("default") == 1

            elapsed, groups = await _arrival_after_write(fetch, release)
            assert [g.group_id for g in groups] == ["g2"] and elapsed < PROMPT_S, elapsed
        finally:
            await client.aclose()


async def test_a_group_sealed_while_redis_restarts_still_arrives_and_the_signal_comes_back(
    redis_server_aof: EmbeddedRedis,
) -> None:
    url = redis_server_aof.url
    other_client = redis_from_url(url)
    other = BufferStore(other_client, StoreLimits(group_size=2))
    async with grpc_buffer(url) as (_, addr):
        client = BufferClient(grpc_addr=addr, wait_seconds=30)
        try:
            await other.write("default", [new_item("a", "g1")])
            fetch: asyncio.Task[list[FetchedGroup]] = asyncio.create_task(client.fetch(1))
            await _until_subscribers(other_client, 1)

            redis_server_aof.kill()
            # Long enough for the subscriber's reconnection attempts to be 2 s apart: it is away when the group seals.
            await asyncio.sleep(3.3)
            redis_server_aof.start()
            await other.write("default", [new_item("b", "g1")])
            written = time.monotonic()
            assert await _subscribers(other_client) == 0, "the signal of this seal should have been lost"
            [group] = await asyncio.wait_for(fetch, 10)
            assert group.group_id == "g1"
            # The next re-check, or the retry of a lease call that met the outage, whichever comes first.
            assert time.monotonic() - written < READY_RECHECK_S + 3.0

            await _until_subscribers(other_client, 1)
            await other.write("default", [new_item("c", "g2")])
            fetch = asyncio.create_task(client.fetch(1))
            elapsed, groups = await _arrival_after_write(
                fetch, partial(other.write, "default", [new_item("d", "g2")])
            )
            assert [g.group_id for g in groups] == ["g2"] and elapsed < PROMPT_S, elapsed
        finally:
            await client.aclose()
            await other_client.aclose()


async def test_shutdown_leaves_no_task_and_no_subscription(
    redis_server: EmbeddedRedis, redis_client: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        async with grpc_buffer(redis_server.url) as (_, addr):
            client = BufferClient(grpc_addr=addr, wait_seconds=30, retry_times=0)
            fetch = asyncio.create_task(client.fetch(1))
            await _until_subscribers(redis_client, 1)
        # The server went away under the waiting fetch: the call fails, and nothing is left behind.
        with pytest.raises(BufferFetchError):
            await fetch
        await client.aclose()
        assert [task for task in asyncio.all_tasks() if task is not asyncio.current_task()] == []
        assert await _subscribers(redis_client) == 0
        gc.collect()
    assert [str(w.message) for w in caught if issubclass(w.category, ResourceWarning | RuntimeWarning)] == []
    assert [r.message for r in caplog.records if r.name == "asyncio"] == []


async def test_the_served_buffer_closes_its_subscription_on_shutdown(
    buffer_config: BufferConfig, redis_client: aioredis.Redis
) -> None:
    with serve(buffer_config) as buffer:
        lease = asyncio.create_task(
            asyncio.to_thread(buffer.http.post, "/v1/groups/lease", json={"wait_seconds": 2})
        )
        await _until_subscribers(redis_client, 1)
        assert (await lease).json()["groups"] == []
    assert await _subscribers(redis_client) == 0


async def test_scripts_publish_once_per_queue_whenever_groups_become_leasable(
    redis_client: aioredis.Redis,
) -> None:
    store = BufferStore(
        redis_client, StoreLimits(group_size=2, group_timeout_s=0.05, expiry_action="deliver")
    )
    pubsub = redis_client.pubsub()
    await pubsub.subscribe(store.ready_channel("r", QUEUE_TRAIN), store.ready_channel("r", QUEUE_EVAL))
    assert (await pubsub.get_message(timeout=1))["type"] == "subscribe"
    assert (await pubsub.get_message(timeout=1))["type"] == "subscribe"

    async def published() -> list[tuple[str, str]]:
        messages = []
        while (message := await pubsub.get_message(timeout=0.1)) is not None:
            messages.append((message["channel"].rsplit(":", 1)[1], message["data"]))
        return sorted(messages)

    try:
        await store.write("r", [new_item("a", "g1"), new_item("b", "g2")])
        assert await published() == [], "open groups are not leasable"
        # Two groups sealed by one call: one message, the count.
        await store.write(
            "r", [new_item("c", "g1"), new_item("d", "g2"), new_item("e", "g3", queue=QUEUE_EVAL)]
        )
        assert await published() == [(QUEUE_TRAIN, "2")]
        await store.write("r", [new_item("c", "g1")])
        assert await published() == [], "a duplicate seals nothing"

        await store.write("r", [new_item("f", "g4")], seal_by_size=False)
        await store.write("r", [new_item("g", "g4")], seal_by_size=False)
        assert await published() == []
        assert await store.seal_if_unchanged("r", "trajectory", "g4", 2) is not None
        assert await published() == [(QUEUE_TRAIN, "1")]

        await asyncio.sleep(0.1)
        assert await store.expire_open_groups("r") == (1, 0)
        assert await published() == [(QUEUE_EVAL, "1")]

        leased = await store.lease("r", 10, lease_seconds=0.05)
        assert len(leased.groups) == 3 and await published() == []
        await asyncio.sleep(0.1)
        assert (await store.lease("r", 1, queue=QUEUE_EVAL)).requeued == 3
        assert await published() == [(QUEUE_TRAIN, "3")]
        await store.lease("r", 10)
        assert await store.release_leases("r") == 4
        assert await published() == [(QUEUE_EVAL, "1"), (QUEUE_TRAIN, "3")]
    finally:
        await pubsub.aclose()


async def test_a_redis_user_without_channel_rights_still_writes_and_its_waits_re_check(
    redis_server: EmbeddedRedis, redis_client: aioredis.Redis
) -> None:
    await redis_client.acl_setuser(
        "writer", enabled=True, passwords=["+pw"], keys=["*"], categories=["+@all"], reset_channels=True
    )
    url = f"redis://writer:pw@127.0.0.1:{redis_server.port}/0"
    client = redis_from_url(url)
    store = BufferStore(client, StoreLimits(group_size=1), redis_url=url, ready_recheck_s=0.2)
    try:
        assert len((await store.write("r", [new_item("a", "g1")])).sealed) == 1
        wait = asyncio.create_task(store.lease_wait("r", 5, min_groups=2, wait_seconds=5))
        await asyncio.sleep(0.3)
        await store.write("r", [new_item("b", "g2")])
        # No signal (the subscription is refused): the next re-check finds both groups.
        assert len((await asyncio.wait_for(wait, 1)).groups) == 2
    finally:
        await store.aclose()
        await client.aclose()
