"""The built-in engine as the HTTP layer sees it: load a checkpoint, start the scheduler, run generations as
async streams of snapshots, and carry out the weight, pause and memory operations of SGLang's API."""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from services.core.process_group import init_weight_update_group
from services.core.wire import SamplingParams
from services.rollout_engine import metrics
from services.rollout_engine.model import CausalLM, KVCache, ModelConfig
from services.rollout_engine.on_policy import ON_POLICY_TARGETS, OnPolicyScorer
from services.rollout_engine.requests import EngineRequest, GenerationParams, RequestError, Snapshot
from services.rollout_engine.scheduler import MEMORY_TAGS, PAUSE_MODES, EngineLimits, Scheduler
from services.rollout_engine.text import TextCodec
from services.rollout_engine.weight_loader import (
    WeightUpdateError,
    apply_named_tensors,
    check_metadata,
    load_initial_weights,
    read_checkpoint,
)
from services.rollout_engine.weight_transport import (
    ADVERTISED_LOAD_FORMATS,
    DISTRIBUTED_LOAD_FORMATS,
    BucketBuffer,
    deserialize_named_tensors,
    parse_dtype,
    receive_broadcasts,
)

logger = logging.getLogger(__name__)

VERSION = "0.1.0"
# A 1-token greedy request, as SGLang's /health_generate sends.
_GREEDY_ONE = SamplingParams(max_new_tokens=1, temperature=0.0)


@dataclass
class EngineSettings:
    """Everything that shapes the built-in engine; SGLang's names where SGLang has the same knob."""

    model_path: str
    device: str = "auto"
    dtype: str = "auto"
    context_length: int | None = None
    max_running_requests: int | None = None
    chunked_prefill_size: int | None = None
    mem_fraction_static: float | None = None
    kv_cache_memory_gb: float | None = None
    random_seed: int = 0
    disable_cuda_graph: bool = False
    served_model_name: str | None = None
    weights_group_timeout_s: float = 600.0
    # SGLang's true on-policy knob: "fsdp" makes returned log-probs those of the torch trainer's forward.
    rl_on_policy_target: str | None = None


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--engine-device cuda requested but no CUDA device is available")
    return device


def _resolve_dtype(name: str, cfg: ModelConfig, device: torch.device) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    dtype = getattr(torch, cfg.torch_dtype, torch.float32)
    # Half-precision matmuls are slow (or missing) on most CPUs; the checkpoint's dtype is kept on GPUs.
    if device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return dtype


def _kv_budget_bytes(settings: EngineSettings, device: torch.device, weight_bytes: int) -> int:
    if settings.kv_cache_memory_gb is not None:
        return int(settings.kv_cache_memory_gb * (1 << 30))
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        fraction = settings.mem_fraction_static or 0.85
        return max(int(total * fraction) - (total - free) - weight_bytes, 0)
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return min(available // 4, 4 << 30)


class BuiltinEngine:
    """One model, one scheduler thread, and the bookkeeping of requests in flight."""

    def __init__(self, settings: EngineSettings):
        from transformers import AutoTokenizer

        self.settings = settings
        self.model_path = str(Path(settings.model_path))
        cfg = ModelConfig.from_dir(self.model_path)
        self.device = _resolve_device(settings.device)
        dtype = _resolve_dtype(settings.dtype, cfg, self.device)
        context = settings.context_length or cfg.max_position_embeddings
        if context > cfg.max_position_embeddings:
            logger.warning(
                "context length %d exceeds the model's max_position_embeddings %d",
                context,
                cfg.max_position_embeddings,
            )
        self.model = CausalLM(cfg, dtype, self.device, max_positions=context)
        load_initial_weights(self.model, self.model_path)
        target = settings.rl_on_policy_target
        if target is not None and target not in ON_POLICY_TARGETS:
            raise ValueError(
                f"--sglang-rl-on-policy-target {target!r}: valid: {', '.join(ON_POLICY_TARGETS)}"
            )
        on_policy = OnPolicyScorer(self.model, self.model_path) if target else None
        weight_bytes = sum(t.numel() * t.element_size() for t in self.model.tensors())
        per_slot = KVCache.bytes_per_token(cfg, dtype) * context
        budget_slots = _kv_budget_bytes(settings, self.device, weight_bytes) // per_slot
        slots = settings.max_running_requests or min(256, budget_slots)
        if slots < 1:
            raise ValueError(
                f"KV cache for one {context}-token sequence ({per_slot >> 20} MiB) does not fit the memory budget; "
                "lower --sglang-context-length or raise --sglang-mem-fraction-static / --kv-cache-memory-gb"
            )
        chunk = settings.chunked_prefill_size or (8192 if self.device.type == "cuda" else 2048)
        self.limits = EngineLimits(
            max_running_requests=slots, context_length=context, chunked_prefill_size=chunk
        )
        self.codec = TextCodec(AutoTokenizer.from_pretrained(self.model_path))
        scheduler_codec = TextCodec(copy.deepcopy(self.codec.tokenizer))
        eos = set(cfg.eos_token_ids)
        if self.codec.tokenizer.eos_token_id is not None:
            eos.add(self.codec.tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(eos)
        self.scheduler = Scheduler(
            self.model,
            self.limits,
            eos_token_ids=self.eos_token_ids,
            decode_tail=scheduler_codec.decode_tail,
            stop_token_lengths=scheduler_codec.stop_token_lengths,
            random_seed=settings.random_seed,
            use_cuda_graphs=self.device.type == "cuda" and not settings.disable_cuda_graph,
            on_policy=on_policy,
        )
        self.served_model_name = settings.served_model_name or self.model_path
        self._in_flight: set[str] = set()
        self._weights_lock = asyncio.Lock()
        # Flattened buckets from /update_weights_from_distributed land here, one request at a time (the lock above).
        self._bucket_buffer = BucketBuffer()
        self._groups: dict[str, Any] = {}
        metrics.WEIGHT_VERSION.info({"version": self.weight_version})
        logger.info(
            "built-in engine: %s on %s (%s), %d slots x %d tokens, prefill chunk %d",
            cfg.architecture,
            self.device,
            str(dtype).removeprefix("torch."),
            slots,
            context,
            chunk,
        )

    # ------------------------------------------------------------------ lifecycle / info

    def start(self) -> None:
        self.scheduler.start()

    def stop(self) -> None:
        self.scheduler.stop()
        for group in self._groups.values():
            torch.distributed.destroy_process_group(group)
        self._groups.clear()

    @property
    def weight_version(self) -> str:
        return self.scheduler.weight_version

    @property
    def vocab_size(self) -> int:
        return self.model.cfg.vocab_size

    def server_info(self) -> dict[str, Any]:
        """SGLang's ``/get_server_info`` shape: server arguments, scheduler info and internal states."""
        cfg = self.model.cfg
        return {
            "model_path": self.model_path,
            "tokenizer_path": self.model_path,
            "served_model_name": self.served_model_name,
            "engine_backend": "builtin",
            "device": str(self.device),
            "dtype": str(self.model.dtype).removeprefix("torch."),
            "tp_size": 1,
            "dp_size": 1,
            "pp_size": 1,
            "ep_size": 1,
            "context_length": self.limits.context_length,
            "max_running_requests": self.limits.max_running_requests,
            "chunked_prefill_size": self.limits.chunked_prefill_size,
            "random_seed": self.settings.random_seed,
            "rl_on_policy_target": self.settings.rl_on_policy_target,
            "weight_version": self.weight_version,
            "weight_update_load_formats": list(ADVERTISED_LOAD_FORMATS),
            "skip_tokenizer_init": False,
            "architecture": cfg.architecture,
            "max_total_num_tokens": self.limits.max_running_requests * self.limits.context_length,
            "max_req_input_len": self.limits.context_length - 1,
            "internal_states": [self.scheduler.state()],
            "version": VERSION,
        }

    # ------------------------------------------------------------------ generation

    def prepare(
        self,
        *,
        rid: str | None,
        text: str | None,
        input_ids: list[int] | None,
        params: GenerationParams,
        field_prefix: str = "",
    ) -> tuple[str, list[int]]:
        """Tokenize and check one prompt against the vocabulary and context length; returns (rid, ids)."""
        ids = list(input_ids) if input_ids is not None else self.codec.encode(text or "")
        where = f"{field_prefix}input_ids" if input_ids is not None else f"{field_prefix}text"
        if not ids:
            raise RequestError("the prompt is empty", where)
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise RequestError(f"token ids outside the vocabulary [0, {self.vocab_size}): {bad[:5]}", where)
        context = self.limits.context_length
        if len(ids) >= context:
            raise RequestError(
                f"The input ({len(ids)} tokens) is longer than the model's context length ({context} tokens).",
                where,
            )
        if params.max_new_tokens is not None and len(ids) + params.max_new_tokens > context:
            raise RequestError(
                f"Requested token count exceeds the model's maximum context length of {context} tokens: "
                f"{len(ids)} prompt tokens + max_new_tokens {params.max_new_tokens}",
                f"{field_prefix}sampling_params.max_new_tokens",
            )
        rid = rid or uuid.uuid4().hex
        if rid in self._in_flight:
            raise RequestError(f"a request with rid {rid!r} is already running", f"{field_prefix}rid")
        return rid, ids

    async def generate(
        self,
        rid: str,
        input_ids: list[int],
        params: GenerationParams,
        *,
        return_logprob: bool = False,
        top_logprobs_num: int = 0,
        logprob_start_len: int = -1,
        stream: bool = False,
    ) -> AsyncIterator[Snapshot]:
        """Submit one request and yield its snapshots (the last one is finished). Leaving early aborts it."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Snapshot] = asyncio.Queue()
        req = EngineRequest(
            rid=rid,
            input_ids=input_ids,
            params=params,
            on_event=lambda snap: loop.call_soon_threadsafe(events.put_nowait, snap),
            return_logprob=return_logprob,
            top_logprobs_num=top_logprobs_num,
            logprob_start_len=logprob_start_len,
            stream=stream,
        )
        self._in_flight.add(rid)
        finished = False
        try:
            self.scheduler.submit(req)
            while not finished:
                snap = await events.get()
                finished = snap.finished
                yield snap
        finally:
            self._in_flight.discard(rid)
            if not finished:
                self.scheduler.abort(rid, "The client went away.")

    async def health_generate(self, timeout: float = 20.0) -> bool:
        """Healthy if the scheduler answers: a 1-token generation when idle, a control round-trip otherwise."""
        if not self.scheduler.alive:
            return False
        state = self.scheduler.state()
        idle = not (state["num_running_reqs"] or state["num_waiting_reqs"] or state["num_prefilling_reqs"])
        try:
            if idle and not state["paused"] and not state["released_tags"]:
                params = GenerationParams.from_wire(_GREEDY_ONE, self.vocab_size)

                async def one() -> None:
                    async for _ in self.generate(f"HEALTH_CHECK_{uuid.uuid4().hex}", [0], params):
                        pass

                await asyncio.wait_for(one(), timeout)
            else:
                await asyncio.wait_for(asyncio.wrap_future(self.scheduler.call(lambda: None)), timeout)
        except TimeoutError:
            return False
        return True

    # ------------------------------------------------------------------ control

    async def run_on_scheduler(self, fn: Any) -> Any:
        return await asyncio.wrap_future(self.scheduler.call(fn))

    async def pause(self, mode: str) -> None:
        if mode not in PAUSE_MODES:
            raise RequestError(f"must be one of {list(PAUSE_MODES)}, got {mode!r}", "mode")
        await self.run_on_scheduler(lambda: self.scheduler.pause(mode))

    async def resume(self) -> None:
        await self.run_on_scheduler(self.scheduler.resume_generation)

    async def flush_cache(self) -> bool:
        return await self.run_on_scheduler(self.scheduler.flush_cache)

    @staticmethod
    def _tags(tags: list[str] | None) -> list[str]:
        tags = list(MEMORY_TAGS) if tags is None else tags
        bad = [t for t in tags if t not in MEMORY_TAGS]
        if bad:
            raise RequestError(f"unknown memory tags {bad}; valid: {list(MEMORY_TAGS)}", "tags")
        return tags

    async def release_memory(self, tags: list[str] | None) -> None:
        tags = self._tags(tags)
        await self.run_on_scheduler(lambda: self.scheduler.release_memory(tags))

    async def resume_memory(self, tags: list[str] | None) -> None:
        tags = self._tags(tags)
        await self.run_on_scheduler(lambda: self.scheduler.resume_memory(tags))

    # ------------------------------------------------------------------ weights

    async def _apply(self, source: str, named: list, version: str | None, started: float) -> int:
        def apply() -> int:
            loaded: list[int] = []
            self.scheduler.apply_weights(
                lambda: loaded.append(apply_named_tensors(self.model, named)), version
            )
            return loaded[0]

        try:
            count = await self.run_on_scheduler(apply)
        except WeightUpdateError:
            metrics.WEIGHT_UPDATES.labels(source, "rejected").inc()
            raise
        except RuntimeError as exc:
            metrics.WEIGHT_UPDATES.labels(source, "rejected").inc()
            raise WeightUpdateError(str(exc), field="weight_version") from exc
        metrics.WEIGHT_UPDATES.labels(source, "ok").inc()
        metrics.WEIGHT_UPDATE_SECONDS.labels(source).observe(time.perf_counter() - started)
        metrics.WEIGHT_VERSION.info({"version": self.weight_version})
        return count

    async def update_from_disk(self, model_path: str, load_format: str | None, version: str | None) -> int:
        if load_format not in (None, "auto", "safetensors"):
            raise WeightUpdateError(
                f"load_format {load_format!r} is not supported from disk (auto, safetensors)",
                field="load_format",
            )
        async with self._weights_lock:
            started = time.perf_counter()
            named = await asyncio.to_thread(read_checkpoint, model_path)
            count = await self._apply("disk", named, version, started)
            self.model_path = str(model_path)
            return count

    async def update_from_tensor(
        self, serialized: list[str], load_format: str | None, version: str | None
    ) -> int:
        if not serialized:
            raise WeightUpdateError("serialized_named_tensors is empty", field="serialized_named_tensors")
        async with self._weights_lock:
            started = time.perf_counter()
            # One entry per tensor-parallel rank; this engine has one rank.
            named = await asyncio.to_thread(deserialize_named_tensors, serialized[0], load_format)
            return await self._apply("tensor", named, version, started)

    async def init_weights_group(
        self,
        *,
        master_address: str,
        master_port: int,
        rank_offset: int,
        world_size: int,
        group_name: str,
        backend: str,
    ) -> None:
        if backend not in ("gloo", "nccl"):
            raise WeightUpdateError(f"backend must be 'gloo' or 'nccl', got {backend!r}", field="backend")
        if backend == "nccl" and self.device.type != "cuda":
            raise WeightUpdateError("backend 'nccl' needs a CUDA engine; use 'gloo' on CPU", field="backend")
        if group_name in self._groups:
            raise WeightUpdateError(
                f"group {group_name!r} already exists; destroy it first", field="group_name"
            )
        if not 0 < rank_offset < world_size:
            raise WeightUpdateError(
                f"rank_offset {rank_offset} must be in [1, world_size={world_size})", field="rank_offset"
            )
        group = await asyncio.to_thread(
            init_weight_update_group,
            master_address=master_address,
            master_port=master_port,
            rank=rank_offset,
            world_size=world_size,
            group_name=group_name,
            backend=backend,
            timeout_s=self.settings.weights_group_timeout_s,
        )
        self._groups[group_name] = group

    async def destroy_weights_group(self, group_name: str) -> None:
        group = self._groups.pop(group_name, None)
        if group is None:
            raise WeightUpdateError(f"no weight-update group named {group_name!r}", field="group_name")
        await asyncio.to_thread(torch.distributed.destroy_process_group, group)

    async def update_from_distributed(
        self,
        names: list[str],
        dtypes: list[str],
        shapes: list[list[int]],
        group_name: str,
        version: str | None,
        load_format: str | None = None,
    ) -> int:
        if load_format not in DISTRIBUTED_LOAD_FORMATS:
            raise WeightUpdateError(
                f"load_format {load_format!r} is not supported for distributed updates; use null (one broadcast "
                "per tensor) or 'flattened_bucket' (one broadcast of the request's tensors' bytes)",
                field="load_format",
            )
        if not len(names) == len(dtypes) == len(shapes):
            raise WeightUpdateError(
                f"names ({len(names)}), dtypes ({len(dtypes)}) and shapes ({len(shapes)}) differ in length"
            )
        negative = [name for name, shape in zip(names, shapes, strict=True) if any(d < 0 for d in shape)]
        if negative:
            raise WeightUpdateError(f"negative dimensions in the shapes of {negative[:5]}", field="shapes")
        group = self._groups.get(group_name)
        if group is None:
            raise WeightUpdateError(
                f"no weight-update group named {group_name!r}; call /init_weights_update_group first",
                field="group_name",
            )
        torch_dtypes = [parse_dtype(d) for d in dtypes]
        backend = torch.distributed.get_backend(group)
        device = self.device if backend == "nccl" else torch.device("cpu")
        async with self._weights_lock:
            started = time.perf_counter()
            problem: WeightUpdateError | None = None
            try:
                check_metadata(
                    self.model,
                    [(n, tuple(s), d) for n, s, d in zip(names, shapes, torch_dtypes, strict=True)],
                )
            except WeightUpdateError as exc:
                problem = exc
            # The sender broadcasts regardless; receive everything so the group stays in step, then decide.
            tensors = await asyncio.to_thread(
                receive_broadcasts, group, shapes, torch_dtypes, device, load_format, self._bucket_buffer
            )
            if problem is not None:
                metrics.WEIGHT_UPDATES.labels("distributed", "rejected").inc()
                raise problem
            return await self._apply("distributed", list(zip(names, tensors, strict=True)), version, started)
