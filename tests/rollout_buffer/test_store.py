"""The Redis store on a real redis-server: idempotency, group completion, leases and acks, expiry, capacity."""

from __future__ import annotations

import asyncio
import time

import pytest

from rollout_buffer.store import (
    KIND_SAMPLE,
    QUEUE_EVAL,
    BufferFullError,
    BufferStore,
    StoreLimits,
    WriteStatus,
    _WriteCoalescer,
)
from tests.rollout_buffer.helpers import new_item

STORED, DUP = WriteStatus.STORED, WriteStatus.DUPLICATE


async def test_writes_are_idempotent_by_uid_and_groups_seal_at_their_size(make_store) -> None:
    store = make_store(group_size=2)
    first = await store.write("r", [new_item("a", "g1"), new_item("a", "g1"), new_item("b", "g2")])
    assert first.statuses == [STORED, DUP, STORED]
    assert first.sealed == []
    again = await store.write("r", [new_item("a", "g1"), new_item("c", "g1")])
    assert again.statuses == [DUP, STORED]
    assert len(again.sealed) == 1

    stats = await store.stats("r")
    assert stats.open_groups == 1 and stats.complete_groups == 1 and stats.items == 3
    assert stats.totals["written"] == 3 and stats.totals["duplicates"] == 2

    leased = await store.lease("r", 10)
    assert [g.instance_id for g in leased.groups] == ["g1"]
    assert [item["uid"] for item in leased.groups[0].items] == ["a", "c"]


async def test_a_per_write_group_size_overrides_the_run_default(make_store) -> None:
    store = make_store(group_size=4)
    result = await store.write("r", [new_item("a", "g", group_size=1)])
    assert len(result.sealed) == 1
    await store.set_run_config("r", group_size=3)
    await store.write("r", [new_item(u, "h") for u in "xy"])
    assert (await store.stats("r")).open_groups == 1
    assert len((await store.write("r", [new_item("z", "h")])).sealed) == 1


async def test_lease_without_ack_comes_back_after_the_timeout_and_ack_removes_it_for_good(make_store) -> None:
    store = make_store(group_size=1)
    await store.write("r", [new_item("a", "g")])
    first = (await store.lease("r", 5, lease_seconds=0.3)).groups
    assert len(first) == 1
    assert (await store.lease("r", 5)).groups == []

    await asyncio.sleep(0.4)
    again = await store.lease("r", 5, lease_seconds=30)
    assert again.requeued == 1
    assert [g.instance_id for g in again.groups] == ["g"] and again.groups[0].redeliveries == 1
    # The first lease is stale: acknowledging it must not delete the group now held by the second reader.
    assert await store.ack("r", [first[0].lease_id]) == []
    assert await store.ack("r", [again.groups[0].lease_id]) == [again.groups[0].lease_id]

    assert (await store.lease("r", 5)).groups == []
    stats = await store.stats("r")
    assert stats.items == 0 and stats.bytes == 0 and stats.complete_groups == 0
    # Acknowledged uids stay known, so a late retry of the same item is still a duplicate.
    assert (await store.write("r", [new_item("a", "g")])).statuses == [DUP]


async def test_a_restarted_trainer_takes_back_its_runs_leases_at_once(make_store) -> None:
    store = make_store(group_size=1)
    await store.write("r", [new_item("a", "g"), new_item("b", "h")])
    await store.write("other", [new_item("c", "k")])
    dead = (await store.lease("r", 5, lease_seconds=300)).groups
    other = (await store.lease("other", 5, lease_seconds=300)).groups
    assert len(dead) == 2 and len(other) == 1
    assert (await store.lease("r", 5)).groups == []

    assert await store.release_leases("r") == 2
    again = await store.lease("r", 5, lease_seconds=30)
    assert sorted(g.instance_id for g in again.groups) == ["g", "h"]
    assert all(g.redeliveries == 1 for g in again.groups)
    # The dead trainer's leases are void; the new ones hold. Another run's lease is untouched.
    assert await store.ack("r", [g.lease_id for g in dead]) == []
    assert (await store.lease("other", 5)).groups == []
    assert await store.ack("other", [other[0].lease_id]) == [other[0].lease_id]


async def test_a_full_buffer_refuses_the_whole_write_and_frees_room_on_ack(make_store) -> None:
    store = make_store(group_size=2, max_items=3)
    await store.write("r", [new_item("a", "g1"), new_item("b", "g1")])
    with pytest.raises(BufferFullError, match="2/3 items"):
        await store.write("r", [new_item("c", "g2"), new_item("d", "g2")])
    stats = await store.stats("r")
    assert stats.items == 2 and stats.open_groups == 0 and stats.totals["rejected_full"] == 2
    # Duplicates take no room, so retrying what is stored still succeeds when full.
    assert (await store.write("r", [new_item("a", "g1")])).statuses == [DUP]

    group = (await store.lease("r", 1)).groups[0]
    await store.ack("r", [group.lease_id])
    assert (await store.write("r", [new_item("c", "g2"), new_item("d", "g2")])).stored == 2


@pytest.mark.parametrize("pipelined", [True, False], ids=["pipelined", "redis-py"])
async def test_concurrent_writes_go_to_redis_as_one_call_each_all_or_nothing(
    redis_client, redis_server, pipelined: bool
) -> None:
    store = BufferStore(
        redis_client,
        StoreLimits(group_size=2, max_items=5),
        redis_url=redis_server.url if pipelined else None,
    )
    await store.write("r", [new_item("warm", "w")])
    await redis_client.config_resetstat()
    results = await asyncio.gather(
        store.write("r", [new_item("a", "g1"), new_item("b", "g1")]),
        store.write("r", [new_item("a", "g1")]),
        store.write("r", [new_item(u, "g2") for u in "cde"]),
        store.write("r", [new_item("f", "g3")]),
        return_exceptions=True,
    )
    assert (await redis_client.info("commandstats"))["cmdstat_evalsha"]["calls"] == 1
    assert results[0].statuses == [STORED, STORED] and len(results[0].sealed) == 1
    assert results[1].statuses == [DUP]
    assert isinstance(results[2], BufferFullError)
    assert results[3].statuses == [STORED]
    # The refused write left nothing behind, its uids included.
    assert (await store.stats("r")).items == 4
    assert (await store.write("r", [new_item("c", "g2")])).statuses == [STORED]
    await store.aclose()


async def test_a_lone_writer_spins_for_its_reply_and_overlapping_writers_do_not(
    redis_client, redis_server, monkeypatch
) -> None:
    monkeypatch.setattr(_WriteCoalescer, "SPIN_QUIET_S", 0.5)
    store = BufferStore(redis_client, StoreLimits(group_size=2), redis_url=redis_server.url)
    spins: list[bool] = []
    write_call = store._write_call

    async def recording(args, spin):
        spins.append(spin)
        return await write_call(args, spin)

    store._write_call = recording
    assert (await store.write("r", [new_item("a", "g1")])).statuses == [STORED]
    assert len((await store.write("r", [new_item("b", "g1")])).sealed) == 1
    assert spins == [True, True]

    # Writes that overlap go together and wait in the event loop, and so does a lone one soon after them.
    results = await asyncio.gather(*(store.write("r", [new_item(u, "g2")]) for u in "cde"))
    assert [r.statuses for r in results] == [[STORED]] * 3
    assert (await store.write("r", [new_item("a", "g1")])).statuses == [DUP]
    assert spins[2:] == [False, False]

    await asyncio.sleep(0.55)
    assert (await store.write("r", [new_item("f", "g3")])).statuses == [STORED]
    assert spins[4:] == [True]
    assert (await store.stats("r")).items == 6
    await store.aclose()


async def test_a_byte_budget_bounds_the_buffer_too(make_store) -> None:
    store = make_store(group_size=1, max_bytes=300)
    await store.write("r", [new_item("a", "g1")])
    with pytest.raises(BufferFullError, match="bytes"):
        await store.write("r", [new_item("b", "g2"), new_item("c", "g3")])


@pytest.mark.parametrize("action", ["drop", "deliver"])
async def test_idle_incomplete_groups_expire_by_the_group_timeout(make_store, action: str) -> None:
    store = make_store(group_size=3, group_timeout_s=0.2, expiry_action=action)
    await store.write("r", [new_item("a", "old"), new_item("b", "old")])
    assert await store.expire_open_groups("r") == (0, 0)
    await asyncio.sleep(0.3)
    await store.write("r", [new_item("c", "fresh")])
    groups, dropped = await store.expire_open_groups("r")
    assert groups == 1
    stats = await store.stats("r")
    assert stats.open_groups == 1
    leased = (await store.lease("r", 5)).groups
    if action == "drop":
        assert dropped == 2 and leased == [] and stats.items == 1
    else:
        assert dropped == 0 and stats.items == 3
        assert [(g.instance_id, g.partial, len(g.items)) for g in leased] == [("old", True, 2)]


async def test_a_group_token_stores_a_whole_group_once(make_store) -> None:
    store = make_store(group_size=1)
    items = [new_item(u, "task-7", kind=KIND_SAMPLE, queue=QUEUE_EVAL, group_size=2) for u in ("s1", "s2")]
    assert (await store.write("r", items, group_token="task-7@3")).stored == 2
    assert await store.group_done("r", "task-7@3")
    other_uids = [
        new_item(u, "task-7", kind=KIND_SAMPLE, queue=QUEUE_EVAL, group_size=2) for u in ("s3", "s4")
    ]
    assert (await store.write("r", other_uids, group_token="task-7@3")).statuses == [DUP, DUP]

    assert (await store.lease("r", 5)).groups == []
    leased = (await store.lease("r", 5, queue=QUEUE_EVAL)).groups
    assert [(g.kind, g.queue, len(g.items)) for g in leased] == [(KIND_SAMPLE, QUEUE_EVAL, 2)]


async def test_runs_are_separate_namespaces_and_leases_go_oldest_first(make_store) -> None:
    store = make_store(group_size=1)
    for i in range(3):
        await store.write("run-a", [new_item(f"a{i}", f"g{i}")])
    await store.write("run-b", [new_item("a0", "g0")])
    assert (await store.write("run-b", [new_item("a1", "g1")])).stored == 1
    leased = await store.lease("run-a", 2)
    assert [g.instance_id for g in leased.groups] == ["g0", "g1"]
    assert (await store.stats("run-b")).complete_groups == 2
    assert [g.instance_id for g in (await store.lease("run-a", 5, kinds=[KIND_SAMPLE])).groups] == []


async def test_lease_wait_returns_as_soon_as_enough_groups_are_complete(make_store) -> None:
    store = make_store(group_size=1)
    await store.write("r", [new_item("a", "g1")])
    assert (await store.lease("r", 5, min_groups=2)).groups == [], "one of the two groups asked for is ready"

    async def later() -> None:
        await asyncio.sleep(0.2)
        await store.write("r", [new_item("b", "g2")])

    writer = asyncio.create_task(later())
    started = time.monotonic()
    result = await store.lease_wait("r", 5, min_groups=2, wait_seconds=5)
    await writer
    assert len(result.groups) == 2
    # Woken by the second group's ready signal, not by the re-check a second later.
    assert time.monotonic() - started < 0.2 + 0.25
    empty = await store.lease_wait("r", 5, min_groups=1, wait_seconds=0.1)
    assert empty.groups == []
