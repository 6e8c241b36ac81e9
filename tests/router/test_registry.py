"""The worker registry in a real Redis: compare-and-set transitions, the prober lease, and state that outlives
the client that wrote it."""

from __future__ import annotations

from router.registry import RedisRegistry, WorkerState
from services.core.embedded_redis import EmbeddedRedis

URL = "http://127.0.0.1:30001"


async def test_add_update_remove_and_a_second_client_sees_it_all(redis_server: EmbeddedRedis) -> None:
    first = RedisRegistry(redis_server.url, "run-a")
    record, created = await first.add(URL)
    assert created and record.state == WorkerState.STARTING
    again, created = await first.add(URL)
    assert not created and again == record

    healthy = await first.update(
        URL,
        {"state": "HEALTHY", "weight_version": "3"},
        expect=[WorkerState.STARTING],
        incr={"errors_total": 2},
    )
    assert healthy is not None and healthy.state == WorkerState.HEALTHY and healthy.errors_total == 2
    # Compare-and-set: a transition from a state the worker is no longer in writes nothing.
    assert await first.update(URL, {"state": "DEAD"}, expect=[WorkerState.STARTING]) is None
    await first.publish_weight_version("4")

    second = RedisRegistry(redis_server.url, "run-a")
    snapshot = await second.snapshot()
    assert snapshot.weight_version == "4"
    assert snapshot.workers[URL].state == WorkerState.HEALTHY
    assert snapshot.workers[URL].weight_version == "3"
    # Another run id is another namespace.
    other = RedisRegistry(redis_server.url, "run-b")
    assert (await other.snapshot()).workers == {}

    assert await second.remove(URL)
    assert not await second.remove(URL)
    assert (await first.snapshot()).workers == {}
    for registry in (first, second, other):
        await registry.close()


async def test_re_adding_a_dead_worker_marks_it_restarting(redis_server: EmbeddedRedis) -> None:
    registry = RedisRegistry(redis_server.url, "run")
    await registry.add(URL)
    await registry.update(URL, {"state": "DEAD", "last_error": None})
    record, created = await registry.add(URL)
    assert not created and record.state == WorkerState.RESTARTING and record.last_error is None
    await registry.close()


async def test_one_prober_lease_holder_at_a_time(redis_server: EmbeddedRedis) -> None:
    registry = RedisRegistry(redis_server.url, "run")
    assert await registry.hold_prober_lease("replica-1", ttl_s=5)
    assert await registry.hold_prober_lease("replica-1", ttl_s=5)
    assert not await registry.hold_prober_lease("replica-2", ttl_s=5)
    await registry.close()


async def test_the_registry_survives_a_redis_restart_with_persistence(
    redis_server_aof: EmbeddedRedis,
) -> None:
    registry = RedisRegistry(redis_server_aof.url, "run")
    await registry.add(URL)
    await registry.update(URL, {"state": "STALE", "weight_version": "1"})
    redis_server_aof.restart()
    snapshot = await registry.snapshot()
    assert snapshot.workers[URL].state == WorkerState.STALE
    await registry.close()
