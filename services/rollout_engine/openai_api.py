"""OpenAI-compatible ``/v1/completions``, ``/v1/chat/completions`` and ``/v1/models`` for agents, streaming
included. The chat template is the tokenizer's own."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from services.core.http_app import ApiError
from services.core.wire import SamplingParams
from services.rollout_engine.engine import BuiltinEngine
from services.rollout_engine.http_api import bad_request, engine_of
from services.rollout_engine.protocol import ChatCompletionRequest, CompletionRequest, OpenAISampling
from services.rollout_engine.requests import GenerationParams, RequestError, Snapshot
from services.rollout_engine.text import TextCodec

router = APIRouter()


def _params(body: OpenAISampling, max_tokens: int | None, engine: BuiltinEngine) -> GenerationParams:
    if body.presence_penalty or body.frequency_penalty:
        field = "presence_penalty" if body.presence_penalty else "frequency_penalty"
        raise ApiError(400, f"{field} is not supported by the built-in engine (only 0)", field=field)
    if body.top_k != -1 and body.top_k < 1:
        raise ApiError(422, f"top_k: must be -1 (all tokens) or at least 1, got {body.top_k}", field="top_k")
    if max_tokens is not None and body.min_tokens > max_tokens:
        raise ApiError(422, f"min_tokens: must be <= max_tokens ({max_tokens})", field="min_tokens")
    wire = SamplingParams(
        max_new_tokens=max_tokens,
        min_new_tokens=body.min_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        min_p=body.min_p,
        stop=body.stop,
        stop_token_ids=body.stop_token_ids,
        ignore_eos=body.ignore_eos,
        skip_special_tokens=body.skip_special_tokens,
        no_stop_trim=body.no_stop_trim,
        sampling_seed=body.seed,
    )
    try:
        return GenerationParams.from_wire(wire, engine.vocab_size, prefix="")
    except RequestError as exc:
        raise bad_request(exc) from exc


def _finish(snap: Snapshot) -> tuple[str | None, Any]:
    reason = snap.finish_reason or {}
    return reason.get("type"), reason.get("matched")


class _DeltaText:
    """Streams text increments, holding back what may still become a stop string or an incomplete character."""

    def __init__(self, codec: TextCodec, params: GenerationParams):
        self.codec = codec
        self.params = params
        self.sent = ""
        self.hold = max((len(s) for s in params.stop), default=1) - 1

    def delta(self, snap: Snapshot) -> str:
        if snap.finished:
            full = self.codec.final_text(snap.output_ids, self.params, snap.finish_reason)
        else:
            full = self.codec.decode(snap.output_ids, self.params).rstrip("\ufffd")
            full = full[: max(len(full) - self.hold, len(self.sent))]
        out = full[len(self.sent) :] if full.startswith(self.sent) else ""
        self.sent += out
        return out


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _prepare(
    engine: BuiltinEngine, body: OpenAISampling, params: GenerationParams, **prompt: Any
) -> tuple[str, list[int]]:
    try:
        return engine.prepare(rid=body.rid, params=params, **prompt)
    except RequestError as exc:
        field = {"input_ids": "prompt", "text": "prompt"}.get(exc.field, exc.field)
        raise bad_request(exc, field) from exc


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    engine = engine_of(request)
    card = {
        "id": engine.served_model_name,
        "object": "model",
        "created": int(time.time()),
        "owned_by": "slime",
        "root": engine.served_model_name,
        "max_model_len": engine.limits.context_length,
    }
    return {"object": "list", "data": [card]}


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request) -> Any:
    engine = engine_of(request)
    if body.echo:
        raise ApiError(400, "echo is not supported by the built-in engine", field="echo")
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise ApiError(400, "one prompt per request is supported", field="prompt")
        prompt = prompt[0]
    params = _params(body, body.max_tokens, engine)
    if isinstance(prompt, str):
        rid, ids = _prepare(engine, body, params, text=prompt, input_ids=None)
    else:
        rid, ids = _prepare(engine, body, params, text=None, input_ids=list(prompt))
    top_n = body.logprobs or 0
    created = int(time.time())
    cid = f"cmpl-{uuid.uuid4().hex}"
    gen = engine.generate(
        rid, ids, params, return_logprob=body.logprobs is not None, top_logprobs_num=top_n, stream=body.stream
    )

    def logprobs_of(snap: Snapshot, start: int) -> dict[str, Any] | None:
        if body.logprobs is None:
            return None
        ids_ = snap.output_ids[start:]
        tokens = engine.codec.token_texts(ids_)
        top = None
        if top_n and snap.output_top_logprobs is not None:
            top = [
                {engine.codec.token_texts([t])[0]: lp for lp, t in row}
                for row in snap.output_top_logprobs[start:]
            ]
        offsets, pos = [], 0
        for token in tokens:
            offsets.append(pos)
            pos += len(token)
        return {
            "tokens": tokens,
            "token_logprobs": snap.output_logprobs[start:],
            "top_logprobs": top,
            "text_offset": offsets,
        }

    if body.stream:
        delta = _DeltaText(engine.codec, params)
        include_usage = bool((body.stream_options or {}).get("include_usage"))

        async def events() -> AsyncIterator[bytes]:
            seen = 0
            last = None
            async for snap in gen:
                last = snap
                text = delta.delta(snap)
                reason, matched = _finish(snap)
                choice = {
                    "index": 0,
                    "text": text,
                    "logprobs": logprobs_of(snap, seen),
                    "finish_reason": reason,
                }
                if reason is not None:
                    choice["matched_stop"] = matched
                seen = len(snap.output_ids)
                yield _sse(
                    {
                        "id": cid,
                        "object": "text_completion",
                        "created": created,
                        "model": engine.served_model_name,
                        "choices": [choice],
                    }
                )
            if include_usage and last is not None:
                yield _sse(
                    {
                        "id": cid,
                        "object": "text_completion",
                        "created": created,
                        "model": engine.served_model_name,
                        "choices": [],
                        "usage": _usage(last.prompt_tokens, len(last.output_ids)),
                    }
                )
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    last = None
    async for snap in gen:
        last = snap
    reason, matched = _finish(last)
    return {
        "id": cid,
        "object": "text_completion",
        "created": created,
        "model": engine.served_model_name,
        "choices": [
            {
                "index": 0,
                "text": engine.codec.final_text(last.output_ids, params, last.finish_reason),
                "logprobs": logprobs_of(last, 0),
                "finish_reason": reason,
                "matched_stop": matched,
            }
        ],
        "usage": _usage(last.prompt_tokens, len(last.output_ids)),
        "metadata": {"weight_version": last.weight_version},
    }


def _chat_prompt(engine: BuiltinEngine, body: ChatCompletionRequest) -> str:
    messages = []
    for i, message in enumerate(body.messages):
        content = message.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text":
                    raise ApiError(
                        400,
                        "only text content parts are supported by the built-in engine",
                        field=f"messages.{i}.content",
                    )
                parts.append(str(part.get("text", "")))
            content = "".join(parts)
        if "role" not in message:
            raise ApiError(422, f"messages.{i}.role: field required", field=f"messages.{i}.role")
        messages.append({**message, "content": content if content is not None else ""})
    try:
        return engine.codec.tokenizer.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=body.add_generation_prompt and not body.continue_final_message,
            continue_final_message=body.continue_final_message,
            **(body.chat_template_kwargs or {}),
        )
    except Exception as exc:
        raise ApiError(400, f"cannot apply the chat template: {exc}", field="messages") from exc


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
    engine = engine_of(request)
    if body.tools:
        raise ApiError(400, "tools are not supported by the built-in engine", field="tools")
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    params = _params(body, max_tokens, engine)
    prompt_text = _chat_prompt(engine, body)
    ids = engine.codec.tokenizer.encode(prompt_text, add_special_tokens=False)
    rid, ids = _prepare(engine, body, params, text=None, input_ids=ids)
    top_n = body.top_logprobs or 0
    created = int(time.time())
    cid = f"chatcmpl-{uuid.uuid4().hex}"
    gen = engine.generate(
        rid, ids, params, return_logprob=body.logprobs, top_logprobs_num=top_n, stream=body.stream
    )

    def logprobs_of(snap: Snapshot, start: int) -> dict[str, Any] | None:
        if not body.logprobs:
            return None
        content = []
        for i, (lp, tok) in enumerate(
            zip(snap.output_logprobs[start:], snap.output_ids[start:], strict=True)
        ):
            text = engine.codec.token_texts([tok])[0]
            entry: dict[str, Any] = {
                "token": text,
                "logprob": lp,
                "bytes": list(text.encode()),
                "top_logprobs": [],
            }
            if top_n and snap.output_top_logprobs is not None:
                for top_lp, top_tok in snap.output_top_logprobs[start + i]:
                    top_text = engine.codec.token_texts([top_tok])[0]
                    entry["top_logprobs"].append(
                        {"token": top_text, "logprob": top_lp, "bytes": list(top_text.encode())}
                    )
            content.append(entry)
        return {"content": content}

    if body.stream:
        delta = _DeltaText(engine.codec, params)
        include_usage = bool((body.stream_options or {}).get("include_usage"))

        def chunk(
            delta_obj: dict[str, Any], reason: str | None, logprobs: Any = None, matched: Any = None
        ) -> bytes:
            choice: dict[str, Any] = {
                "index": 0,
                "delta": delta_obj,
                "logprobs": logprobs,
                "finish_reason": reason,
            }
            if reason is not None:
                choice["matched_stop"] = matched
            return _sse(
                {
                    "id": cid,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": engine.served_model_name,
                    "choices": [choice],
                }
            )

        async def events() -> AsyncIterator[bytes]:
            yield chunk({"role": "assistant", "content": ""}, None)
            seen = 0
            last = None
            async for snap in gen:
                last = snap
                text = delta.delta(snap)
                reason, matched = _finish(snap)
                if text or reason is not None:
                    yield chunk({"content": text} if text else {}, reason, logprobs_of(snap, seen), matched)
                seen = len(snap.output_ids)
            if include_usage and last is not None:
                yield _sse(
                    {
                        "id": cid,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": engine.served_model_name,
                        "choices": [],
                        "usage": _usage(last.prompt_tokens, len(last.output_ids)),
                    }
                )
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    last = None
    async for snap in gen:
        last = snap
    reason, matched = _finish(last)
    return {
        "id": cid,
        "object": "chat.completion",
        "created": created,
        "model": engine.served_model_name,
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": engine.codec.final_text(last.output_ids, params, last.finish_reason),
                },
                "logprobs": logprobs_of(last, 0),
                "finish_reason": reason,
                "matched_stop": matched,
            }
        ],
        "usage": _usage(last.prompt_tokens, len(last.output_ids)),
        "metadata": {"weight_version": last.weight_version},
    }
