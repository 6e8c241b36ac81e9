"""SGLang's native HTTP endpoints served by the built-in engine, with SGLang's paths, fields and status codes.

Every response also carries the served weight version in the ``X-Weight-Version`` header; the JSON answers of
the management endpoints carry it as ``weight_version``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from services.core.http_app import ApiError
from services.core.wire import GenerateRequest
from services.rollout_engine.engine import BuiltinEngine
from services.rollout_engine.protocol import (
    AbortReq,
    DestroyWeightsUpdateGroupReq,
    InitWeightsUpdateGroupReq,
    MemoryOccupationReq,
    PauseGenerationReq,
    UpdateWeightFromDiskReq,
    UpdateWeightsFromDistributedReq,
    UpdateWeightsFromTensorReq,
    UpdateWeightVersionReq,
    generate_output,
)
from services.rollout_engine.requests import GenerationParams, RequestError
from services.rollout_engine.weight_loader import WeightUpdateError

logger = logging.getLogger(__name__)

router = APIRouter()

M = TypeVar("M", bound=BaseModel)


def engine_of(request: Request) -> BuiltinEngine:
    return request.app.state.engine


async def optional_body(request: Request, model: type[M]) -> M:
    """Parse a JSON body that SGLang also accepts absent (GET, or POST without a body)."""
    raw = await request.body()
    if not raw.strip():
        return model()
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ApiError(422, f"malformed JSON body: {exc}", field="body") from exc
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from exc


def bad_request(exc: RequestError, field: str | None = None) -> ApiError:
    """A 400 whose message starts with the field at fault, like the validation errors."""
    field = field or exc.field
    return ApiError(400, f"{field}: {exc}", field=field)


def _int_extra(req: GenerateRequest, name: str, default: int) -> int:
    value = (req.model_extra or {}).get(name, default)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool):
        raise ApiError(422, f"{name}: must be an integer, got {value!r}", field=name)
    return value


def _update_result(engine: BuiltinEngine, ok: bool, message: str, **extra: Any) -> JSONResponse:
    body = {"success": ok, "message": message, "weight_version": engine.weight_version, **extra}
    return JSONResponse(body, status_code=200 if ok else 400)


# ---------------------------------------------------------------------- generation


@router.api_route("/generate", methods=["POST", "PUT"])
async def generate(body: GenerateRequest, request: Request) -> Any:
    engine = engine_of(request)
    if body.image_data is not None:
        raise ApiError(
            400, "image_data is not supported by the built-in engine (text models only)", field="image_data"
        )
    if body.stream and body.is_batch:
        raise ApiError(400, "stream is supported for a single prompt only", field="stream")
    logprob_start_len = _int_extra(body, "logprob_start_len", -1)
    top_logprobs_num = _int_extra(body, "top_logprobs_num", 0)
    if top_logprobs_num < 0:
        raise ApiError(422, "top_logprobs_num: must be >= 0", field="top_logprobs_num")
    items = body.split()
    jobs = []
    for i, item in enumerate(items):
        prefix = f"[{i}]." if body.is_batch else ""
        try:
            params = GenerationParams.from_wire(item.sampling_params, engine.vocab_size)
            rid, ids = engine.prepare(
                rid=item.rid, text=item.text, input_ids=item.input_ids, params=params, field_prefix=prefix
            )
        except RequestError as exc:
            raise bad_request(exc) from exc
        jobs.append((rid, ids, params, bool(item.return_logprob)))

    def run(job: tuple) -> AsyncIterator:
        rid, ids, params, return_logprob = job
        return engine.generate(
            rid,
            ids,
            params,
            return_logprob=return_logprob,
            top_logprobs_num=top_logprobs_num,
            logprob_start_len=logprob_start_len,
            stream=body.stream,
        )

    def render(snap: Any, job: tuple) -> dict[str, Any]:
        return generate_output(
            snap,
            job[2],
            engine.codec,
            return_logprob=job[3],
            return_text_in_logprobs=body.return_text_in_logprobs,
            top_logprobs_num=top_logprobs_num,
        )

    if body.stream:
        job = jobs[0]

        async def events() -> AsyncIterator[bytes]:
            async for snap in run(job):
                yield b"data: " + json.dumps(render(snap, job)).encode() + b"\n\n"
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    async def collect(job: tuple) -> dict[str, Any]:
        last = None
        async for snap in run(job):
            last = snap
        return render(last, job)

    results = await _unless_disconnected(request, asyncio.gather(*(collect(job) for job in jobs)))
    return results if body.is_batch else results[0]


async def _unless_disconnected(request: Request, work: asyncio.Future) -> Any:
    """Await ``work``, cancelling it (which aborts its requests) if the client hangs up first."""
    task = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait({task}, timeout=1.0)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            raise ApiError(499, "client disconnected")


@router.get("/health_generate")
async def health_generate(request: Request) -> Response:
    ok = await engine_of(request).health_generate()
    return Response(status_code=200 if ok else 503)


# ---------------------------------------------------------------------- information


@router.get("/get_model_info")
async def get_model_info(request: Request) -> dict[str, Any]:
    engine = engine_of(request)
    return {
        "model_path": engine.model_path,
        "tokenizer_path": engine.settings.model_path,
        "is_generation": True,
        "preferred_sampling_params": None,
        "weight_version": engine.weight_version,
    }


@router.get("/get_weight_version")
async def get_weight_version(request: Request) -> dict[str, Any]:
    return {"weight_version": engine_of(request).weight_version}


@router.get("/get_server_info")
@router.get("/server_info")
async def get_server_info(request: Request) -> dict[str, Any]:
    engine = engine_of(request)
    info = await engine.run_on_scheduler(engine.server_info)
    return info


# ---------------------------------------------------------------------- control


@router.api_route("/flush_cache", methods=["GET", "POST"])
async def flush_cache(request: Request) -> Response:
    ok = await engine_of(request).flush_cache()
    return PlainTextResponse(
        "Cache flushed.\nPlease check backend logs for more details. "
        "(When there are running or waiting requests, the operation will not be performed.)\n",
        status_code=200 if ok else 400,
    )


@router.post("/abort_request")
async def abort_request(request: Request) -> Response:
    body = await optional_body(request, AbortReq)
    engine = engine_of(request)
    if body.abort_all:
        engine.scheduler.abort(None, "Aborted by abort_request (abort_all).")
    elif body.rid:
        engine.scheduler.abort(body.rid, "Aborted by abort_request.")
    return Response(status_code=200)


@router.post("/pause_generation")
async def pause_generation(request: Request) -> dict[str, Any]:
    body = await optional_body(request, PauseGenerationReq)
    engine = engine_of(request)
    try:
        await engine.pause(body.mode)
    except RequestError as exc:
        raise bad_request(exc) from exc
    return {
        "message": "Generation paused successfully.",
        "status": "ok",
        "weight_version": engine.weight_version,
    }


@router.post("/continue_generation")
async def continue_generation(request: Request) -> dict[str, Any]:
    engine = engine_of(request)
    await engine.resume()
    return {
        "message": "Generation continued successfully.",
        "status": "ok",
        "weight_version": engine.weight_version,
    }


@router.api_route("/release_memory_occupation", methods=["GET", "POST"])
async def release_memory_occupation(request: Request) -> dict[str, Any]:
    body = await optional_body(request, MemoryOccupationReq)
    engine = engine_of(request)
    try:
        await engine.release_memory(body.tags)
    except RequestError as exc:
        raise bad_request(exc) from exc
    return {"success": True, "message": "Memory released.", "weight_version": engine.weight_version}


@router.api_route("/resume_memory_occupation", methods=["GET", "POST"])
async def resume_memory_occupation(request: Request) -> dict[str, Any]:
    body = await optional_body(request, MemoryOccupationReq)
    engine = engine_of(request)
    try:
        await engine.resume_memory(body.tags)
    except RequestError as exc:
        raise bad_request(exc) from exc
    return {"success": True, "message": "Memory resumed.", "weight_version": engine.weight_version}


@router.post("/update_weight_version")
async def update_weight_version(body: UpdateWeightVersionReq, request: Request) -> dict[str, Any]:
    engine = engine_of(request)
    if body.abort_all_requests:
        engine.scheduler.abort(None, "Aborted by update_weight_version.")

    def set_version() -> None:
        engine.scheduler.weight_version = body.new_version

    await engine.run_on_scheduler(set_version)
    return {
        "success": True,
        "message": f"Weight version updated to {body.new_version}",
        "new_version": body.new_version,
        "weight_version": engine.weight_version,
    }


# ---------------------------------------------------------------------- weights


async def _weight_update(request: Request, body: Any, source: str, work: Any, **extra: Any) -> JSONResponse:
    engine = engine_of(request)
    if getattr(body, "abort_all_requests", False):
        engine.scheduler.abort(None, f"Aborted for a weight update from {source}.")
    try:
        count = await work
    except WeightUpdateError as exc:
        logger.warning("rejected weight update from %s: %s", source, exc)
        return _update_result(engine, False, str(exc), field=exc.field, **extra)
    message = f"Succeeded to update {count} tensors from {source}."
    if body.weight_version is not None:
        message += f" Weight version updated to {body.weight_version}."
    return _update_result(engine, True, message, **extra)


@router.post("/update_weights_from_disk")
async def update_weights_from_disk(body: UpdateWeightFromDiskReq, request: Request) -> JSONResponse:
    engine = engine_of(request)
    work = engine.update_from_disk(body.model_path, body.load_format, body.weight_version)
    return await _weight_update(request, body, "disk", work, num_paused_requests=0)


@router.post("/update_weights_from_tensor")
async def update_weights_from_tensor(body: UpdateWeightsFromTensorReq, request: Request) -> JSONResponse:
    engine = engine_of(request)
    work = engine.update_from_tensor(body.serialized_named_tensors, body.load_format, body.weight_version)
    return await _weight_update(request, body, "tensor", work)


@router.post("/init_weights_update_group")
async def init_weights_update_group(body: InitWeightsUpdateGroupReq, request: Request) -> JSONResponse:
    engine = engine_of(request)
    try:
        await engine.init_weights_group(
            master_address=body.master_address,
            master_port=body.master_port,
            rank_offset=body.rank_offset,
            world_size=body.world_size,
            group_name=body.group_name,
            backend=body.backend,
        )
    except WeightUpdateError as exc:
        return _update_result(engine, False, str(exc), field=exc.field)
    except Exception as exc:
        logger.exception("joining weight-update group %s failed", body.group_name)
        return _update_result(engine, False, f"Failed to init group: {type(exc).__name__}: {exc}")
    return _update_result(engine, True, "Succeeded to initialize custom process group.")


@router.post("/update_weights_from_distributed")
async def update_weights_from_distributed(
    body: UpdateWeightsFromDistributedReq, request: Request
) -> JSONResponse:
    engine = engine_of(request)
    work = engine.update_from_distributed(
        body.names, body.dtypes, body.shapes, body.group_name, body.weight_version, body.load_format
    )
    return await _weight_update(request, body, "distributed", work)


@router.post("/destroy_weights_update_group")
async def destroy_weights_update_group(request: Request) -> JSONResponse:
    body = await optional_body(request, DestroyWeightsUpdateGroupReq)
    engine = engine_of(request)
    try:
        await engine.destroy_weights_group(body.group_name)
    except WeightUpdateError as exc:
        return _update_result(engine, False, str(exc), field=exc.field)
    return _update_result(engine, True, f"Succeeded to destroy group {body.group_name}.")


class WeightVersionHeader:
    """Pure-ASGI middleware adding ``X-Weight-Version`` to every response (streams stay unbuffered)."""

    def __init__(self, app: Any, engine: BuiltinEngine):
        self.app = app
        self.engine = engine

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_version(message: dict) -> None:
            if message["type"] == "http.response.start":
                version = self.engine.weight_version.encode("latin-1", "replace")
                message["headers"] = [*message.get("headers", []), (b"x-weight-version", version)]
            await send(message)

        await self.app(scope, receive, send_with_version)
