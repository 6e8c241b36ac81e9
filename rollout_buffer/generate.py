"""slime's default single-turn generation, token in / token out, against the router's SGLang ``/generate``.

``generate(args, sample, sampling_params)`` is what ``slime.rollout.sglang_rollout.generate`` names in slime: a
fresh sample is tokenized and sent as ``input_ids``; a partial (aborted) sample is continued from its tokens with
the remaining token budget. The new tokens, their log-probs, the text and the engine's weight version are appended,
and the finish reason sets the status (stop -> completed, length -> truncated, abort -> aborted).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import weakref
from pathlib import Path
from typing import Any

import orjson

from services.core.sample import Sample
from services.core.upstream import UpstreamError, UpstreamPool

logger = logging.getLogger(__name__)

_FINISH_STATUS = {
    "stop": Sample.Status.COMPLETED,
    "length": Sample.Status.TRUNCATED,
    "abort": Sample.Status.ABORTED,
}


class GenerateConfigError(ValueError):
    """The flags do not say how to generate (no router address, no tokenizer); the message names the flag."""


def router_url(args: Any) -> str:
    """The router's base URL: --router-url, else http://--sglang-router-ip:--sglang-router-port."""
    url = getattr(args, "router_url", None)
    if url:
        return url.rstrip("/")
    ip, port = getattr(args, "sglang_router_ip", None), getattr(args, "sglang_router_port", None)
    if ip and port:
        return f"http://{ip}:{port}"
    raise GenerateConfigError(
        "no router to generate with: pass --router-url (or --sglang-router-ip and --sglang-router-port)"
    )


_tokenizers: dict[str, Any] = {}
# A connection pool belongs to one event loop: one per loop (a process normally runs exactly one). The pool is
# the router's own HTTP/1.1 client: with a hundred requests in flight, httpx's pool spends more CPU choosing a
# connection than the request itself costs.
_pools: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, UpstreamPool] = weakref.WeakKeyDictionary()
_JSON = [(b"content-type", b"application/json")]


class RouterError(RuntimeError):
    """The router answered ``/generate`` with an error status, or no answer came within the request timeout."""


def tokenizer_of(args: Any) -> Any:
    """The tokenizer of --hf-checkpoint, loaded once per process."""
    checkpoint = getattr(args, "hf_checkpoint", None)
    if not checkpoint:
        raise GenerateConfigError(
            "--hf-checkpoint is required: the default generate tokenizes prompts with it"
        )
    if checkpoint not in _tokenizers:
        from transformers import AutoTokenizer

        _tokenizers[checkpoint] = AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=True)
    return _tokenizers[checkpoint]


def _pool() -> UpstreamPool:
    loop = asyncio.get_running_loop()
    pool = _pools.get(loop)
    if pool is None:
        pool = _pools[loop] = UpstreamPool(connect_timeout=10.0)
    return pool


async def close_clients() -> None:
    """Close this loop's connections to the router."""
    pool = _pools.pop(asyncio.get_running_loop(), None)
    if pool is not None:
        await pool.close()


async def _post_generate(args: Any, url: str, payload: dict[str, Any]) -> Any:
    timeout = getattr(args, "sglang_router_request_timeout_secs", None) or 3600
    try:
        async with asyncio.timeout(timeout):
            response = await _pool().request(url, "POST", "/generate", _JSON, json.dumps(payload).encode())
            body = await response.read()
    except TimeoutError:
        raise RouterError(
            f"router {url}/generate gave no answer within {timeout:g}s (--sglang-router-request-timeout-secs)"
        ) from None
    except UpstreamError as exc:
        raise RouterError(f"router {url}/generate failed: {exc}") from exc
    if response.status >= 400:
        text = body[:300].decode("utf-8", "replace")
        raise RouterError(f"router {url}/generate answered {response.status}: {text}")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        # Python's json also reads the NaN and ±Infinity an engine may write for a log-prob; orjson refuses them.
        return json.loads(body)


def _image_data(part: dict[str, Any]) -> str:
    """An image part as SGLang's image_data entry: a URL or data URI as is, a file path as base64."""
    source = part.get("image") or part.get("path") or part.get("url")
    if not isinstance(source, str) or not source:
        raise ValueError(f"image part has no 'path', 'image' or 'url': {sorted(part)}")
    if source.startswith(("http://", "https://", "data:")):
        return source
    return base64.b64encode(Path(source).read_bytes()).decode()


def _prompt_text(prompt: str | list[dict[str, Any]], tokenizer: Any) -> tuple[str, list[str]]:
    """The text to tokenize and the images of a prompt; each image becomes the tokenizer's image token."""
    if isinstance(prompt, str):
        return prompt, []
    image_token = getattr(tokenizer, "special_tokens_map", {}).get("image_token", "<image>")
    text, images = [], []
    for part in prompt:
        if part.get("type") == "text":
            text.append(part.get("text", ""))
        elif part.get("type") == "image":
            text.append(image_token)
            images.append(_image_data(part))
        else:
            raise ValueError(
                f"prompt part of type {part.get('type')!r}: only 'text' and 'image' are supported"
            )
    return "".join(text), images


async def generate(args: Any, sample: Sample, sampling_params: dict[str, Any]) -> Sample:
    """Generate (or continue) ``sample``'s response through the router; returns the same, updated sample."""
    if sample.status not in (Sample.Status.PENDING, Sample.Status.ABORTED):
        raise ValueError(
            f"sample {sample.uid}: generate needs a pending or aborted sample, got {sample.status}"
        )
    url = router_url(args)
    params = dict(sampling_params)
    payload: dict[str, Any] = {"return_logprob": True}
    if sample.response:
        # A partial sample: continue from its tokens within what is left of the token budget.
        budget = params.get("max_new_tokens")
        if budget is not None:
            params["max_new_tokens"] = budget - sample.response_length
            if params["max_new_tokens"] <= 0:
                sample.status = Sample.Status.TRUNCATED
                return sample
        payload["input_ids"] = list(sample.tokens)
    else:
        images = _tokenize_prompt(args, sample)
        payload["input_ids"] = list(sample.tokens)
        if images:
            payload["image_data"] = images
    payload["sampling_params"] = params
    _apply_output(sample, await _post_generate(args, url, payload))
    return sample


async def generate_fresh_batch(
    args: Any, samples: list[Sample], sampling_params: list[dict[str, Any]]
) -> list[Sample]:
    """Generate the responses of fresh (pending, nothing generated yet, text-only) ``samples`` in one batched
    ``/generate`` request, SGLang's ``input_ids`` list with one ``sampling_params`` per prompt.

    Each sample is sampled independently, exactly as with one ``generate`` call each; one request per group instead
    of one per sample saves the per-request cost of every hop (worker, router, engine), and the engine sees the
    group's shared prompt together.
    """
    for sample in samples:
        if sample.status is not Sample.Status.PENDING or sample.response:
            raise ValueError(f"sample {sample.uid}: a batched generate takes fresh samples only")
        if not is_text_only(sample):
            raise ValueError(f"sample {sample.uid}: a batched generate takes text-only prompts")
    # A group's samples share their prompt: tokenized once.
    tokenized: dict[bytes, list[int]] = {}
    for sample in samples:
        key = orjson.dumps(sample.prompt)
        if key in tokenized:
            sample.tokens = list(tokenized[key])
            continue
        _tokenize_prompt(args, sample)
        tokenized[key] = list(sample.tokens)
    payload = {
        "input_ids": [list(sample.tokens) for sample in samples],
        "sampling_params": [dict(params) for params in sampling_params],
        "return_logprob": True,
    }
    outputs = await _post_generate(args, router_url(args), payload)
    if not isinstance(outputs, list) or len(outputs) != len(samples):
        raise RouterError(
            f"router {router_url(args)}/generate answered a batch of {len(samples)} with "
            f"{len(outputs) if isinstance(outputs, list) else 'a single'} output(s)"
        )
    for sample, output in zip(samples, outputs, strict=True):
        _apply_output(sample, output)
    return samples


def is_text_only(sample: Sample) -> bool:
    """Whether the prompt has no images (a batched generate takes only those)."""
    return isinstance(sample.prompt, str) or all(part.get("type") == "text" for part in sample.prompt)


def _tokenize_prompt(args: Any, sample: Sample) -> list[str]:
    """Set a fresh sample's tokens to its prompt's; returns the prompt's images."""
    tokenizer = tokenizer_of(args)
    text, images = _prompt_text(sample.prompt, tokenizer)
    sample.tokens = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return images


def _apply_output(sample: Sample, output: dict[str, Any]) -> None:
    """Append one ``/generate`` output (tokens, log-probs, text, weight version) to ``sample`` and set its status."""
    meta = output.get("meta_info", {})
    pairs = meta.get("output_token_logprobs") or []
    new_tokens = [int(entry[1]) for entry in pairs]
    sample.tokens = list(sample.tokens) + new_tokens
    sample.rollout_log_probs = list(sample.rollout_log_probs or []) + [float(entry[0]) for entry in pairs]
    sample.response += output.get("text", "")
    sample.response_length += len(new_tokens)
    if meta.get("weight_version") is not None:
        sample.weight_versions.append(str(meta["weight_version"]))
    finish = (meta.get("finish_reason") or {}).get("type")
    sample.status = _FINISH_STATUS.get(finish, Sample.Status.COMPLETED)
