"""Real grpc.aio servers and clients on loopback: unary and streaming calls, retries across a late server start,
deadlines, and the Struct/Value conversions."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from google.protobuf import struct_pb2

from protos import slime_pb2, slime_pb2_grpc
from services.core.grpc_util import (
    DEFAULT_DEADLINE_S,
    create_grpc_server,
    dict_to_struct,
    grpc_channel,
    python_to_value,
    struct_to_dict,
    value_to_python,
)
from services.core.sample import Sample


class Trainer(slime_pb2_grpc.TrainerServiceServicer):
    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.calls = 0

    async def GetStatus(
        self, request: slime_pb2.StatusRequest, context: grpc.aio.ServicerContext
    ) -> slime_pb2.TrainerStatus:
        self.calls += 1
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        return slime_pb2.TrainerStatus(
            run_id=request.run_id, rollout_id=7, weight_version=3, state="training", reward_mean=0.25
        )


class Buffer(slime_pb2_grpc.BufferServiceServicer):
    def __init__(self, groups: list[list[Sample]]) -> None:
        self.groups = groups

    async def FetchGroups(self, request: slime_pb2.FetchRequest, context: grpc.aio.ServicerContext):
        for i, samples in enumerate(self.groups[: request.max_groups]):
            yield slime_pb2.Group(
                group_id=f"g{i}", lease_id=f"lease-{i}", samples=[sample.to_proto() for sample in samples]
            )

    async def Ack(
        self, request: slime_pb2.AckRequest, context: grpc.aio.ServicerContext
    ) -> slime_pb2.AckResponse:
        return slime_pb2.AckResponse(acked=len(request.lease_ids))


async def start_trainer(port: int, servicer: Trainer) -> grpc.aio.Server:
    server = create_grpc_server(port)
    slime_pb2_grpc.add_TrainerServiceServicer_to_server(servicer, server)
    await server.start()
    return server


async def test_trainer_service_answers_through_grpc_channel(free_port: int) -> None:
    servicer = Trainer()
    server = await start_trainer(free_port, servicer)
    try:
        async with grpc_channel(f"127.0.0.1:{free_port}") as channel:
            stub = slime_pb2_grpc.TrainerServiceStub(channel)
            status = await stub.GetStatus(slime_pb2.StatusRequest(run_id="run-1"), timeout=DEFAULT_DEADLINE_S)
        assert (status.run_id, status.rollout_id, status.weight_version, status.state) == (
            "run-1",
            7,
            3,
            "training",
        )
        assert status.reward_mean == pytest.approx(0.25)
        assert servicer.calls == 1
    finally:
        await server.stop(grace=None)


async def test_samples_stream_through_buffer_service(free_port: int) -> None:
    groups = [
        [
            Sample(
                group_index=g,
                index=2 * g + i,
                prompt=f"q{g}",
                tokens=[1, 2, 3],
                response_length=1,
                reward=1.0,
            )
            for i in range(2)
        ]
        for g in range(3)
    ]
    server = create_grpc_server(free_port, max_workers=2)
    slime_pb2_grpc.add_BufferServiceServicer_to_server(Buffer(groups), server)
    await server.start()
    try:
        async with grpc_channel(f"127.0.0.1:{free_port}") as channel:
            stub = slime_pb2_grpc.BufferServiceStub(channel)
            received = [
                group
                async for group in stub.FetchGroups(
                    slime_pb2.FetchRequest(run_id="r", max_groups=2), timeout=5
                )
            ]
            ack = await stub.Ack(
                slime_pb2.AckRequest(run_id="r", lease_ids=[g.lease_id for g in received]), timeout=5
            )
        assert [g.group_id for g in received] == ["g0", "g1"]
        assert [[Sample.from_proto(s) for s in g.samples] for g in received] == groups[:2]
        assert ack.acked == 2
    finally:
        await server.stop(grace=None)


async def test_call_made_while_server_is_down_succeeds_once_it_comes_up(free_port: int) -> None:
    servicer = Trainer()
    async with grpc_channel(f"127.0.0.1:{free_port}") as channel:
        stub = slime_pb2_grpc.TrainerServiceStub(channel)
        call = asyncio.ensure_future(stub.GetStatus(slime_pb2.StatusRequest(run_id="late"), timeout=10))
        # Wait for the first attempt to fail (the channel reports the refused connection), then start the server.
        state = channel.get_state()
        while state != grpc.ChannelConnectivity.TRANSIENT_FAILURE:
            await asyncio.wait_for(channel.wait_for_state_change(state), timeout=5)
            state = channel.get_state()
        assert not call.done(), "the call should be waiting to retry, not failed"
        server = await start_trainer(free_port, servicer)
        try:
            status = await call
        finally:
            await server.stop(grace=None)
    assert status.run_id == "late"
    assert servicer.calls == 1


async def test_without_the_retry_policy_the_same_call_fails_fast(free_port: int) -> None:
    # The control for the test above: with retries off, a call to a port nobody listens on fails at once.
    async with grpc_channel(f"127.0.0.1:{free_port}", options=[("grpc.enable_retries", 0)]) as channel:
        stub = slime_pb2_grpc.TrainerServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as excinfo:
            await stub.GetStatus(slime_pb2.StatusRequest(run_id="x"), timeout=10)
    assert excinfo.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_expired_deadline_gives_deadline_exceeded(free_port: int) -> None:
    servicer = Trainer(delay_s=2.0)
    server = await start_trainer(free_port, servicer)
    try:
        async with grpc_channel(f"127.0.0.1:{free_port}") as channel:
            stub = slime_pb2_grpc.TrainerServiceStub(channel)
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as excinfo:
                await stub.GetStatus(slime_pb2.StatusRequest(run_id="slow"), timeout=0.2)
        assert excinfo.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 1.5
        assert servicer.calls == 1, "DEADLINE_EXCEEDED must not be retried"
    finally:
        await server.stop(grace=None)


async def test_blocking_channel_reaches_aio_server(free_port: int) -> None:
    server = await start_trainer(free_port, Trainer())
    try:
        channel = grpc_channel(f"127.0.0.1:{free_port}", aio=False)
        try:
            stub = slime_pb2_grpc.TrainerServiceStub(channel)
            status = await asyncio.to_thread(
                stub.GetStatus, slime_pb2.StatusRequest(run_id="sync"), timeout=5
            )
        finally:
            channel.close()
        assert status.run_id == "sync"
    finally:
        await server.stop(grace=None)


async def test_second_server_on_a_taken_port_fails_naming_the_address(free_port: int) -> None:
    server = await start_trainer(free_port, Trainer())
    try:
        with pytest.raises(OSError, match=f"127.0.0.1:{free_port}"):
            create_grpc_server(free_port)
    finally:
        await server.stop(grace=None)


@pytest.mark.parametrize("port", [0, -1, 70000])
def test_server_port_out_of_range_is_rejected(port: int) -> None:
    with pytest.raises(ValueError, match="port"):
        create_grpc_server(port)


@pytest.mark.parametrize("addr", ["", "http://127.0.0.1:9000"])
def test_channel_rejects_http_urls_and_empty_addresses(addr: str) -> None:
    with pytest.raises(ValueError, match="host:port"):
        grpc_channel(addr)


def test_struct_round_trip_keeps_types() -> None:
    data = {
        "round_number": 3,
        "start_rollout_id": 0,
        "big": 2**53,
        "ratio": 0.5,
        "negative": -12.25,
        "flag": True,
        "none": None,
        "name": "x",
        "nested": {"list": [1, 2.5, "a", None, False, {"deep": []}], "empty": {}},
    }
    back = struct_to_dict(dict_to_struct(data))
    assert back == data
    assert type(back["round_number"]) is int
    assert type(back["ratio"]) is float
    assert type(back["flag"]) is bool
    assert type(back["nested"]["list"][0]) is int


def test_value_round_trip_of_scalars_and_lists() -> None:
    for obj in ["text", 1, 1.5, True, None, [], [{"type": "text", "text": "hi"}], (1, 2)]:
        expected = list(obj) if isinstance(obj, tuple) else obj
        assert value_to_python(python_to_value(obj)) == expected
    assert value_to_python(struct_pb2.Value()) is None


def test_struct_conversion_errors_name_the_path() -> None:
    with pytest.raises(ValueError, match=r"meta\.ids\[1\].*too large"):
        dict_to_struct({"ids": [1, 2**60]}, path="meta")
    with pytest.raises(TypeError, match=r"struct\.blob: bytes"):
        dict_to_struct({"blob": b"x"})
    with pytest.raises(TypeError, match=r"struct\.inner: key 1"):
        dict_to_struct({"inner": {1: "a"}})
