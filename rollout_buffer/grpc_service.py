"""``slime.v1.BufferService``: the trainer's streaming fetch of complete groups (leased) and their ack.

The queue (``train`` or ``eval``) is chosen with the call metadata key ``x-slime-queue``; it defaults to ``train``.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import AsyncIterator

import grpc

from protos import slime_pb2, slime_pb2_grpc
from rollout_buffer.convert import trajectory_to_sample
from rollout_buffer.service import BufferService
from rollout_buffer.store import KIND_SAMPLE, QUEUE_TRAIN, QUEUES, Group
from services.core.http_app import ApiError
from services.core.sample import Sample

logger = logging.getLogger(__name__)

QUEUE_METADATA_KEY = "x-slime-queue"
DEFAULT_MAX_GROUPS = 64


def group_to_proto(group: Group) -> slime_pb2.Group:
    if group.kind == KIND_SAMPLE:
        samples = [Sample.from_dict(item) for item in group.items]
    else:
        samples = [trajectory_to_sample(item) for item in group.items]
    return slime_pb2.Group(
        group_id=group.instance_id, lease_id=group.lease_id, samples=[sample.to_proto() for sample in samples]
    )


class BufferServicer(slime_pb2_grpc.BufferServiceServicer):
    """Serves one BufferService; with ``auth_token`` every call needs ``authorization: Bearer <token>`` metadata.

    A waiting FetchGroups wakes on the store's ready signal; ``poll_seconds`` makes it poll the store that often
    instead (the behaviour before the signal, kept as the benchmarks' baseline).
    """

    def __init__(
        self, service: BufferService, *, auth_token: str | None = None, poll_seconds: float | None = None
    ):
        self.service = service
        self.poll_seconds = poll_seconds
        self._auth = f"Bearer {auth_token}".encode() if auth_token else None

    async def _run_id(self, run_id: str, context: grpc.aio.ServicerContext) -> str:
        if self._auth is not None:
            sent = dict(context.invocation_metadata() or ()).get("authorization", "")
            if not hmac.compare_digest(sent.encode(), self._auth):
                await context.abort(
                    grpc.StatusCode.UNAUTHENTICATED,
                    "missing or invalid bearer token: send metadata 'authorization: Bearer <token>'",
                )
        try:
            return self.service.run_of(run_id or None)
        except ApiError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, exc.message)
            raise

    async def FetchGroups(
        self, request: slime_pb2.FetchRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[slime_pb2.Group]:
        run_id = await self._run_id(request.run_id, context)
        queue = dict(context.invocation_metadata() or ()).get(QUEUE_METADATA_KEY, QUEUE_TRAIN)
        if queue not in QUEUES:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{QUEUE_METADATA_KEY}: must be one of {list(QUEUES)}, got {queue!r}",
            )
        if (
            request.max_groups < 0
            or request.min_groups < 0
            or request.lease_seconds < 0
            or request.wait_seconds < 0
        ):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "max_groups, min_groups, lease_seconds and wait_seconds must not be negative",
            )
        max_groups = request.max_groups or DEFAULT_MAX_GROUPS
        deadline = time.monotonic() + request.wait_seconds
        sent = 0
        # Groups are streamed as they become complete: until max_groups, or min_groups and nothing more ready now,
        # or the wait is over. A client that drops the stream leaves its groups leased until the lease expires.
        while sent < max_groups:
            wait = deadline - time.monotonic() if sent < max(request.min_groups, 1) else 0.0
            leased = await self.service.lease(
                run_id,
                max_groups - sent,
                api="grpc",
                wait_seconds=max(0.0, wait),
                lease_seconds=request.lease_seconds or None,
                queue=queue,
                poll_seconds=self.poll_seconds,
            )
            if not leased.groups:
                break
            for group in leased.groups:
                yield group_to_proto(group)
            sent += len(leased.groups)

    async def Ack(
        self, request: slime_pb2.AckRequest, context: grpc.aio.ServicerContext
    ) -> slime_pb2.AckResponse:
        run_id = await self._run_id(request.run_id, context)
        acked = await self.service.ack(run_id, list(request.lease_ids), api="grpc")
        return slime_pb2.AckResponse(acked=len(acked))
