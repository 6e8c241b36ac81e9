"""slime's rollout-buffer endpoints, same paths and bodies, so slime's generators and trainer plugin run unchanged.

``/buffer/write`` stores one item durably before answering; ``/get_rollout_data`` leases every complete group and
acknowledges the lease only once the response has been handed to the connection (slime's client never acks).
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.background import BackgroundTask
from starlette.routing import Route

from rollout_buffer import metrics
from rollout_buffer.schemas import Trajectory, parse_json, validate
from rollout_buffer.service import BufferService
from rollout_buffer.store import KIND_TRAJECTORY
from services.core.http_app import ApiError

logger = logging.getLogger(__name__)

# slime's /get_rollout_data lease: long enough to serialise and send a large read.
SLIME_READ_LEASE_S = 600.0


def _service(request: Request) -> BufferService:
    return request.app.state.buffer


async def buffer_write(request: Request) -> Response:
    """Store one trajectory item ``{uid, instance_id, messages, reward, extra_info}``."""
    service = _service(request)
    raw = await request.body()
    item = parse_json(raw)
    if not isinstance(item, dict):
        metrics.child(metrics.REJECTED, "invalid_field").inc()
        raise ApiError(422, "body: must be one JSON object (a trajectory item)", field="body")
    validate(Trajectory, item)
    # Stored verbatim, as slime stores it; extra_info is added when missing since slime's readers require it.
    payload = raw if "extra_info" in item else orjson.dumps({**item, "extra_info": {}})
    item.setdefault("extra_info", {})
    result = await service.write_trajectories(
        service.run_of(None), [item], group_size=None, source="slime", payloads=[payload]
    )
    message = (
        b"Data has been successfully written to buffer"
        if result.stored
        else b"Duplicate uid: the item was already stored"
    )
    # slime echoes the item back; building the bytes avoids a second validation pass on the way out.
    body = b'{"success":true,"message":"%s","data":{"data":[%s],"meta_info":"write to buffer"}}' % (
        message,
        payload,
    )
    return Response(body, media_type="application/json")


# The hot path: a plain Starlette route, which the app's front (asgi_front.py) calls directly, spared FastAPI's
# layers; the app's middleware and error handlers still apply, and the body is validated against the
# Trajectory model as everywhere else.
WRITE_ROUTE = Route("/buffer/write", buffer_write, methods=["POST"], include_in_schema=False)


def build_router() -> APIRouter:
    router = APIRouter(tags=["slime"])
    # On the app too: it answers the path's other methods (405).
    router.add_route(WRITE_ROUTE.path, buffer_write, methods=["POST"], include_in_schema=False)

    @router.post("/get_rollout_data")
    async def get_rollout_data(request: Request) -> Response:
        """Every complete trajectory group, flattened, with slime's meta info (the body is ignored)."""
        service = _service(request)
        run_id = service.run_of(None)
        leased = await service.lease(
            run_id,
            service.settings.slime_read_max_groups,
            api="slime",
            lease_seconds=SLIME_READ_LEASE_S,
            kinds=[KIND_TRAJECTORY],
        )
        if not leased.groups:
            meta = await service.meta_info(run_id, {})
            return JSONResponse(
                {
                    "success": False,
                    "message": "No data available to read",
                    "data": {"data": [], "meta_info": meta},
                }
            )
        pairs = await service.transform(run_id, leased.groups)
        groups: dict[Any, list[dict[str, Any]]] = {}
        for instance_id, items in pairs:
            groups.setdefault(instance_id, []).extend(items)
        meta = await service.meta_info(run_id, groups)
        meta["finished_groups"] = list(groups)
        data = [item for _, items in pairs for item in items]
        lease_ids = [group.lease_id for group in leased.groups]
        logger.info("slime read: %d groups, %d items", len(pairs), len(data))
        body = {
            "success": True,
            "message": f"Successfully read {len(data)} items",
            "data": {"data": data, "meta_info": meta},
        }
        return Response(
            orjson.dumps(body, option=orjson.OPT_NON_STR_KEYS),
            media_type="application/json",
            background=BackgroundTask(service.ack, run_id, lease_ids, api="slime"),
        )

    @router.post("/start_rollout")
    async def start_rollout(request: Request) -> dict[str, str]:
        """Run the generator of ``task_type`` with slime's payload; its group size is ``num_repeat_per_sample``."""
        service = _service(request)
        payload = parse_json(await request.body())
        if not isinstance(payload, dict):
            raise ApiError(422, "body: must be a JSON object (slime's start_rollout payload)", field="body")
        task_type = payload.get("task_type")
        if not isinstance(task_type, str) or not task_type:
            raise ApiError(422, "task_type: required, a non-empty string", field="task_type")
        if service.registry.get(task_type) is None:
            known = service.registry.task_types
            raise ApiError(
                422,
                f"task_type: no generator for {task_type!r}; known task types: {known} "
                "(add one with --generator-dir or --generator-module)",
                field="task_type",
            )
        group_size = _positive_int(payload.get("num_repeat_per_sample", 1), "num_repeat_per_sample")
        started = await service.start_rollout(service.run_of(None), task_type, group_size, payload)
        return {"message": "Rollout started" if started else "Rollout already running"}

    return router


def _positive_int(value: Any, name: str) -> int:
    # slime's trainer sends every number of this payload as a string.
    try:
        number = int(str(value))
    except ValueError:
        raise ApiError(422, f"{name}: must be a positive integer, got {value!r}", field=name) from None
    if number < 1 or isinstance(value, bool):
        raise ApiError(422, f"{name}: must be a positive integer, got {value!r}", field=name)
    return number
