"""Request bodies of SGLang's management endpoints (field names and defaults from SGLang's ``io_struct.py``) and
of the OpenAI-compatible endpoints, plus the ``/generate`` response builder."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from services.rollout_engine.requests import GenerationParams, Snapshot
from services.rollout_engine.text import TextCodec


class _SGLangReq(BaseModel):
    # SGLang ignores fields it does not know; so do we, so that newer clients keep working.
    model_config = ConfigDict(extra="ignore")


class UpdateWeightFromDiskReq(_SGLangReq):
    model_path: str = Field(min_length=1)
    load_format: str | None = None
    abort_all_requests: bool = False
    weight_version: str | None = None
    flush_cache: bool = True


class UpdateWeightsFromTensorReq(_SGLangReq):
    # Base64 strings, one per tensor-parallel rank of the engine.
    serialized_named_tensors: list[str] = Field(min_length=1)
    load_format: str | None = None
    flush_cache: bool = True
    abort_all_requests: bool = False
    weight_version: str | None = None


class InitWeightsUpdateGroupReq(_SGLangReq):
    master_address: str = Field(min_length=1)
    master_port: int = Field(gt=0, lt=65536)
    rank_offset: int = Field(ge=1)
    world_size: int = Field(ge=2)
    group_name: str = "weight_update_group"
    backend: str = "nccl"


class UpdateWeightsFromDistributedReq(_SGLangReq):
    names: list[str] = Field(min_length=1)
    dtypes: list[str]
    shapes: list[list[int]]
    group_name: str = "weight_update_group"
    flush_cache: bool = True
    abort_all_requests: bool = False
    weight_version: str | None = None
    load_format: str | None = None


class DestroyWeightsUpdateGroupReq(_SGLangReq):
    group_name: str = "weight_update_group"


class MemoryOccupationReq(_SGLangReq):
    # SGLang's tags: "weights", "kv_cache" (and "cuda_graph"); null means all of them.
    tags: list[str] | None = None


class PauseGenerationReq(_SGLangReq):
    mode: str = "abort"


class AbortReq(_SGLangReq):
    rid: str | None = ""
    abort_all: bool = False


class UpdateWeightVersionReq(_SGLangReq):
    new_version: str = Field(min_length=1)
    abort_all_requests: bool = True


# ---------------------------------------------------------------------- OpenAI


class OpenAISampling(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str | None = None
    temperature: float = Field(default=1.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = -1
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    min_tokens: int = Field(default=0, ge=0)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    no_stop_trim: bool = False
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    rid: str | None = None


class CompletionRequest(OpenAISampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=0)
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False


class ChatCompletionRequest(OpenAISampling):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=0)
    max_completion_tokens: int | None = Field(default=None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False


# ---------------------------------------------------------------------- /generate output


def generate_output(
    snap: Snapshot,
    params: GenerationParams,
    codec: TextCodec,
    *,
    return_logprob: bool,
    return_text_in_logprobs: bool,
    top_logprobs_num: int,
) -> dict[str, Any]:
    """SGLang's ``/generate`` answer: ``text``, ``output_ids`` and ``meta_info`` (cumulative for stream chunks)."""
    if snap.finished:
        text = codec.final_text(snap.output_ids, params, snap.finish_reason)
    else:
        text = codec.decode(snap.output_ids, params)
    meta: dict[str, Any] = {
        "id": snap.rid,
        "finish_reason": snap.finish_reason,
        "prompt_tokens": snap.prompt_tokens,
        "weight_version": snap.weight_version,
        "completion_tokens": len(snap.output_ids),
        "cached_tokens": snap.cached_tokens,
    }
    if return_logprob:
        texts = (
            codec.token_texts(snap.output_ids) if return_text_in_logprobs else [None] * len(snap.output_ids)
        )
        meta["output_token_logprobs"] = [
            [lp, tok, t] for lp, tok, t in zip(snap.output_logprobs, snap.output_ids, texts, strict=True)
        ]
        inputs = snap.input_logprobs or []
        in_texts = (
            codec.token_texts([tok for _, tok in inputs]) if return_text_in_logprobs else [None] * len(inputs)
        )
        meta["input_token_logprobs"] = [[lp, tok, t] for (lp, tok), t in zip(inputs, in_texts, strict=True)]
        if top_logprobs_num > 0 and snap.output_top_logprobs is not None:
            meta["output_top_logprobs"] = [
                [
                    [lp, tok, codec.token_texts([tok])[0] if return_text_in_logprobs else None]
                    for lp, tok in row
                ]
                for row in snap.output_top_logprobs
            ]
    if snap.finished_at is not None:
        meta["e2e_latency"] = snap.finished_at - snap.created
    return {"text": text, "output_ids": snap.output_ids, "meta_info": meta}
