"""The trainer-side client against a served buffer: gRPC streaming fetch, HTTP fallback, leases and acks,
--min-batch-collection-ratio and --fetch-trajectory-retry-times."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import orjson
import pytest

from rollout_buffer.client import BufferClient, BufferFetchError
from rollout_buffer.server import BufferConfig
from rollout_buffer.store import KIND_SAMPLE, QUEUE_EVAL, QUEUE_TRAIN, BufferStore, NewItem
from services.core.net import free_port
from services.core.sample import Sample
from tests.rollout_buffer.helpers import ServedBuffer, serve, trajectory


def _samples(group: int, n: int = 2) -> list[Sample]:
    return [
        Sample(
            group_index=group,
            index=group * n + i,
            prompt="2+2=",
            tokens=[5, 6, 7, 8 + i],
            response="4",
            response_length=2,
            label="4",
            reward={"score": 1.0, "acc": True},
            loss_mask=[1, 1],
            weight_versions=["3"],
            rollout_log_probs=[-0.25, -0.5],
            status=Sample.Status.COMPLETED,
            metadata={"round_number": 1},
            uid=f"s{group}-{i}",
        )
        for i in range(n)
    ]


async def _put_samples(store: BufferStore, group: int, queue: str = QUEUE_TRAIN) -> list[Sample]:
    samples = _samples(group)
    items = [
        NewItem(
            uid=s.uid,
            instance_id=f"task-{group}",
            payload=orjson.dumps(s.to_dict()),
            kind=KIND_SAMPLE,
            queue=queue,
            group_size=len(samples),
        )
        for s in samples
    ]
    await store.write("default", items, group_token=f"task-{group}@0")
    return samples


async def test_grpc_stream_delivers_sample_groups_exactly_and_ack_deletes_them(
    buffer: ServedBuffer, make_store
) -> None:
    store = make_store()
    written = [await _put_samples(store, g) for g in range(3)]
    client = BufferClient(grpc_addr=buffer.grpc_addr, wait_seconds=1.0)
    try:
        groups = await client.fetch(3)
        assert [g.group_id for g in groups] == ["task-0", "task-1", "task-2"]
        assert [g.samples for g in groups] == written
        assert await client.ack([g.lease_id for g in groups]) == 3
        assert await client.ack([g.lease_id for g in groups]) == 0
    finally:
        await client.aclose()
    assert (await store.stats("default")).items == 0


async def test_agent_trajectories_arrive_untokenized_over_grpc_and_http(buffer: ServedBuffer) -> None:
    items = [trajectory("a", 5, reward=0.0, round_number=1), trajectory("b", 5, reward=1.0, round_number=1)]
    buffer.http.post("/v1/trajectories", json={"items": items}).raise_for_status()
    grpc_client = BufferClient(buffer.url, wait_seconds=1.0)
    try:
        [group] = await grpc_client.fetch(1)
        assert grpc_client.grpc_addr == buffer.grpc_addr
        assert group.samples == [] and group.trajectories == items
        await grpc_client.ack([group.lease_id])
    finally:
        await grpc_client.aclose()

    buffer.http.post("/v1/trajectories", json={"items": [trajectory("c", "x"), trajectory("d", "x")]})
    http_client = BufferClient(buffer.url, wait_seconds=1.0)
    http_client._discovered = True
    try:
        [group] = await http_client.fetch(1)
        assert [t["uid"] for t in group.trajectories] == ["c", "d"] and group.group_id == "x"
        with pytest.raises(ValueError, match="MultiTurnLossMaskGenerator"):
            group.to_samples()
    finally:
        await http_client.aclose()


async def test_unacked_groups_come_back_after_the_lease(buffer: ServedBuffer, make_store) -> None:
    await _put_samples(make_store(), 0)
    client = BufferClient(grpc_addr=buffer.grpc_addr, wait_seconds=0.2, lease_seconds=0.3)
    try:
        [first] = await client.fetch(1)
        await asyncio.sleep(0.4)
        [again] = await client.fetch(1)
        assert again.group_id == first.group_id and again.lease_id != first.lease_id
        assert await client.ack([first.lease_id]) == 0
        assert await client.ack([again.lease_id]) == 1
    finally:
        await client.aclose()


async def test_falls_back_to_http_when_grpc_is_down(buffer: ServedBuffer, make_store) -> None:
    await _put_samples(make_store(), 0)
    client = BufferClient(buffer.url, grpc_addr=f"127.0.0.1:{free_port()}", wait_seconds=0.5)
    try:
        [group] = await client.fetch(1)
        assert group.group_id == "task-0" and len(group.samples) == 2
        assert await client.ack([group.lease_id]) == 1
    finally:
        await client.aclose()


async def test_min_batch_collection_ratio_takes_a_partial_batch_only_down_to_the_ratio(
    buffer: ServedBuffer, make_store
) -> None:
    store = make_store()
    for g in range(3):
        await _put_samples(store, g)
    partial = BufferClient(grpc_addr=buffer.grpc_addr, wait_seconds=0.3, min_batch_collection_ratio=0.75)
    full = BufferClient(grpc_addr=buffer.grpc_addr, wait_seconds=0.3)
    try:
        started = time.monotonic()
        assert len(await partial.fetch(4)) == 3
        assert time.monotonic() - started < 3

        async def fourth() -> None:
            await asyncio.sleep(0.8)
            await _put_samples(store, 3)
            await _put_samples(store, 4)

        for g in range(5, 8):
            await _put_samples(store, g)
        writer = asyncio.create_task(fourth())
        # 3 are ready, ratio 1 needs 5: the fetch waits past several empty windows for the rest.
        groups = await full.fetch(5)
        await writer
        assert len(groups) == 5
    finally:
        await partial.aclose()
        await full.aclose()


async def test_retry_times_bounds_failed_fetches() -> None:
    client = BufferClient(
        f"http://127.0.0.1:{free_port()}", retry_times=2, retry_backoff_s=0.01, wait_seconds=0.1
    )
    client._discovered = True
    try:
        with pytest.raises(BufferFetchError, match="failed 3 times \\(--fetch-trajectory-retry-times 2\\)"):
            await client.fetch(1)
    finally:
        await client.aclose()
    with pytest.raises(ValueError, match="--min-batch-collection-ratio"):
        BufferClient("http://x", min_batch_collection_ratio=0)


async def test_eval_queue_and_bearer_token_over_grpc(buffer_config: BufferConfig, make_store) -> None:
    store = make_store()
    await _put_samples(store, 0, queue=QUEUE_EVAL)
    with serve(replace(buffer_config, auth_token="tok")) as buffer:
        anonymous = BufferClient(grpc_addr=buffer.grpc_addr, wait_seconds=0.1)
        train = BufferClient(
            grpc_addr=buffer.grpc_addr, auth_token="tok", wait_seconds=0.1, min_batch_collection_ratio=0.5
        )
        evaluation = BufferClient(
            grpc_addr=buffer.grpc_addr, auth_token="tok", queue=QUEUE_EVAL, wait_seconds=0.1
        )
        try:
            with pytest.raises(BufferFetchError, match="bearer token"):
                await anonymous.fetch(1)
            await _put_samples(store, 1)
            assert [g.group_id for g in await train.fetch(2)] == ["task-1"]
            assert [g.group_id for g in await evaluation.fetch(1)] == ["task-0"]
        finally:
            for client in (anonymous, train, evaluation):
                await client.aclose()
