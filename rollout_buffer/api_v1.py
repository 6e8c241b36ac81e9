"""The versioned buffer API: batch submission with per-item results, two-phase reads (lease, then ack), stats.

Writes are all-or-nothing and idempotent by uid; a full buffer answers 429 with Retry-After and stores nothing.
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

from rollout_buffer.schemas import (
    AckRequest,
    AckResponse,
    GroupOut,
    ItemResult,
    LeaseRequest,
    LeaseResponse,
    StatsResponse,
    TrajectoryBatch,
    WriteResponse,
    parse_json,
    validate,
)
from rollout_buffer.service import BufferService


def _service(request: Request) -> BufferService:
    return request.app.state.buffer


def _json(model: Any) -> Response:
    return Response(orjson.dumps(model.model_dump()), media_type="application/json")


def build_router() -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["v1"])

    @router.post("/trajectories", response_model=WriteResponse)
    async def write_trajectories(request: Request) -> Response:
        """Store a batch of trajectory items; each result says ``stored`` or ``duplicate`` (already stored)."""
        service = _service(request)
        data = parse_json(await request.body())
        batch = validate(TrajectoryBatch, data)
        run_id = service.run_of(batch.run_id)
        items = data["items"]
        for item in items:
            item.setdefault("extra_info", {})
        result = await service.write_trajectories(run_id, items, group_size=batch.group_size, source="v1")
        return _json(
            WriteResponse(
                run_id=run_id,
                stored=result.stored,
                duplicates=result.duplicates,
                results=[
                    ItemResult(uid=item["uid"], instance_id=item["instance_id"], status=status.value)
                    for item, status in zip(items, result.statuses, strict=True)
                ],
                sealed_groups=len(result.sealed),
            )
        )

    @router.post("/groups/lease", response_model=LeaseResponse)
    async def lease_groups(request: Request) -> Response:
        """Lease complete groups, oldest first, waiting up to ``wait_seconds`` for ``min_groups`` of them."""
        service = _service(request)
        body = validate(LeaseRequest, parse_json(await request.body() or b"{}"))
        run_id = service.run_of(body.run_id)
        leased = await service.lease(
            run_id,
            body.max_groups,
            api="v1",
            min_groups=body.min_groups,
            wait_seconds=body.wait_seconds,
            lease_seconds=body.lease_seconds,
            queue=body.queue,
            kinds=body.kinds,
        )
        return _json(
            LeaseResponse(
                run_id=run_id,
                groups=[
                    GroupOut(
                        group_id=group.group_id,
                        lease_id=group.lease_id,
                        instance_id=group.instance_id,
                        kind=group.kind,
                        queue=group.queue,
                        partial=group.partial,
                        redeliveries=group.redeliveries,
                        sealed_at_ms=group.sealed_at_ms,
                        items=group.items,
                    )
                    for group in leased.groups
                ],
            )
        )

    @router.post("/groups/ack", response_model=AckResponse)
    async def ack_groups(request: Request) -> Response:
        """Acknowledge leased groups: they are deleted for good. Stale lease ids are listed, not an error."""
        service = _service(request)
        body = validate(AckRequest, parse_json(await request.body()))
        run_id = service.run_of(body.run_id)
        acked = await service.ack(run_id, body.lease_ids, api="v1")
        done = set(acked)
        return _json(
            AckResponse(run_id=run_id, acked=len(acked), stale=[x for x in body.lease_ids if x not in done])
        )

    @router.get("/stats", response_model=StatsResponse)
    async def stats(request: Request, run_id: str | None = None) -> Response:
        """Groups complete and incomplete, queue depths, held items/bytes, lag, and run-wide totals."""
        service = _service(request)
        run = service.run_of(run_id)
        s = await service.store.stats(run)
        queued, pending = await service.task_queue_depths(run)
        return _json(
            StatsResponse(
                run_id=run,
                groups_complete=s.complete_groups,
                groups_incomplete=s.open_groups,
                groups_ready=s.ready_groups,
                groups_leased=s.leased_groups,
                items_held=s.items,
                bytes_held=s.bytes,
                max_items=s.max_items,
                max_bytes=s.max_bytes,
                oldest_ready_age_s=s.oldest_ready_age_s,
                longest_open_idle_s=s.longest_open_idle_s,
                group_size=s.group_size,
                task_type=s.task_type or service.settings.task_type,
                tasks_pending=pending,
                tasks_queued=queued,
                totals=s.totals,
            )
        )

    @router.get("/info")
    async def info(request: Request) -> dict[str, Any]:
        """Where the gRPC BufferService listens and what this buffer serves (clients discover gRPC here)."""
        service = _service(request)
        return {
            "service": "rollout-buffer",
            "run_id": service.settings.run_id,
            "grpc_port": service.settings.grpc_port,
            "task_types": service.registry.task_types,
        }

    return router
