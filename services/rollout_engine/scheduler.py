"""The built-in engine's scheduler: one thread that owns the model and runs continuous batching.

Each iteration admits waiting requests into prefill (chunked by ``chunked_prefill_size`` tokens, so a long prompt
cannot stall the running batch), then runs one batched decode step for every running sequence. Sequences join
the running batch when their prompt is prefilled and leave it the step they finish. Control operations (abort,
pause, weight updates, memory release) are queued to this thread and run between two steps, so the model is only
ever touched by one thread.
"""

from __future__ import annotations

import collections
import logging
import queue
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from services.rollout_engine import metrics
from services.rollout_engine.cuda_graphs import DecodeGraphs
from services.rollout_engine.model import CausalLM, ForwardBatch, KVCache, PrefillSegment, StageCache
from services.rollout_engine.on_policy import OnPolicyScorer
from services.rollout_engine.requests import EngineRequest, Snapshot
from services.rollout_engine.sampling import SamplingRow, sample

logger = logging.getLogger(__name__)

MEMORY_TAGS = ("weights", "kv_cache", "cuda_graph")
PAUSE_MODES = ("abort", "retract", "in_place")


@dataclass(eq=False)
class Sequence:
    """A request inside the scheduler. Its keys/values cover ``all_ids[:num_computed]``; while running, exactly
    the last token is not yet in the cache (it is the next decode input)."""

    req: EngineRequest
    all_ids: list[int]
    seed: int
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[float, int]]] | None = None
    input_logprobs: list[tuple[float | None, int]] | None = None
    want_input_logprobs: bool = False
    num_computed: int = 0
    # Prompt tokens whose keys/values were copied from an identical prompt's instead of computed.
    cached_tokens: int = 0
    stage: StageCache | None = None
    finish_reason: dict[str, Any] | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    arrived_at: float = field(default_factory=time.perf_counter)

    @property
    def rid(self) -> str:
        return self.req.rid


@dataclass
class EngineLimits:
    max_running_requests: int
    context_length: int
    chunked_prefill_size: int


class Scheduler:
    """Runs requests on ``model`` with a slot KV cache; every public method is safe to call from any thread."""

    def __init__(
        self,
        model: CausalLM,
        limits: EngineLimits,
        *,
        eos_token_ids: frozenset[int],
        decode_tail: Callable[[list[int]], str],
        stop_token_lengths: Callable[[tuple[str, ...]], int],
        random_seed: int = 0,
        use_cuda_graphs: bool = False,
        weight_version: str = "default",
        on_policy: OnPolicyScorer | None = None,
    ):
        self.model = model
        self.limits = limits
        self.eos_token_ids = eos_token_ids
        self._decode_tail = decode_tail
        self._stop_token_lengths = stop_token_lengths
        self._rng = random.Random(random_seed)
        self.weight_version = weight_version
        self.on_policy = on_policy
        self.kv: KVCache | None = self._new_kv_cache()
        self.graphs = (
            DecodeGraphs(model, limits.max_running_requests, limits.context_length)
            if use_cuda_graphs
            else None
        )
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.prefilling: list[Sequence] = []
        self.running: list[Sequence] = []
        self.paused = False
        self.released: set[str] = set()
        # The last memory operations, oldest first, with the weight version each saw (state(), for operators).
        self.memory_log: collections.deque[dict[str, Any]] = collections.deque(maxlen=64)
        self._weight_backup: list[torch.Tensor] | None = None
        self._inbox: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._stop = threading.Event()
        self.last_step_at = time.monotonic()
        self._thread = threading.Thread(target=self._loop, name="engine-scheduler", daemon=True)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._inbox.put(lambda: None)
        self._thread.join(timeout=10)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # ------------------------------------------------------------------ thread-safe API

    def submit(self, req: EngineRequest) -> None:
        self._inbox.put(lambda: self._add(req))

    def abort(self, rid: str | None, message: str = "Abort requested by the client.") -> None:
        """Abort one request by id (unknown ids are ignored, as in SGLang) or every request when ``rid`` is None."""
        self._inbox.put(lambda: self._abort(rid, message))

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn`` on the scheduler thread between two steps; the future carries its result or exception."""
        future: Future = Future()

        def run() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)

        self._inbox.put(run)
        return future

    # The following run on the scheduler thread (pass them to ``call``).

    def pause(self, mode: str) -> None:
        if mode == "abort":
            self._abort(None, "Aborted by pause_generation.")
        elif mode == "retract":
            self._retract_all()
        self.paused = True

    def resume_generation(self) -> None:
        self.paused = False

    def flush_cache(self) -> bool:
        """Reset the KV cache; refused (False) while requests are queued or running, as SGLang does."""
        if self.waiting or self.prefilling or self.running:
            return False
        if self.kv is not None:
            self.kv.reset()
        return True

    def release_memory(self, tags: list[str]) -> None:
        """Drop the KV cache and/or move the weights off the device; running requests are retracted and wait."""
        self._retract_all()
        if "cuda_graph" in tags and self.graphs is not None:
            self.graphs.clear()
        if "kv_cache" in tags and self.kv is not None:
            self.kv = None
            if self.graphs is not None:
                self.graphs.clear()
        if "weights" in tags and self._weight_backup is None:
            self._weight_backup = self._offload_weights()
            if self.graphs is not None:
                self.graphs.clear()
        self.released.update(tags)
        if self.model.device.type == "cuda":
            torch.cuda.empty_cache()
        self._log_memory("release", tags)

    def resume_memory(self, tags: list[str]) -> None:
        if "weights" in tags and self._weight_backup is not None:
            self._restore_weights(self._weight_backup)
            self._weight_backup = None
        if "kv_cache" in tags and self.kv is None:
            self.kv = self._new_kv_cache()
        self.released.difference_update(tags)
        self._log_memory("resume", tags)

    def _log_memory(self, action: str, tags: list[str]) -> None:
        for tag in tags:
            metrics.MEMORY_OCCUPATION.labels(action, tag).inc()
        self.memory_log.append({"action": action, "tags": list(tags), "weight_version": self.weight_version})

    def apply_weights(self, apply: Callable[[], None], version: str | None) -> None:
        """Run ``apply`` (which copies validated tensors into the live weights) and set the weight version."""
        if self._weight_backup is not None:
            raise RuntimeError("weights are released (release_memory_occupation); resume tag 'weights' first")
        apply()
        if version is not None:
            self.weight_version = version

    def state(self) -> dict[str, Any]:
        kv_used = sum(len(s.all_ids) for s in self.running)
        return {
            "num_running_reqs": len(self.running),
            "num_prefilling_reqs": len(self.prefilling),
            "num_waiting_reqs": len(self.waiting),
            "num_used_tokens": kv_used,
            "max_total_num_tokens": self.limits.max_running_requests * self.limits.context_length,
            "paused": self.paused,
            "released_tags": sorted(self.released),
            "memory_log": list(self.memory_log),
            "weight_version": self.weight_version,
        }

    # ------------------------------------------------------------------ loop

    def _loop(self) -> None:
        while not self._stop.is_set():
            busy = self._can_run() and bool(self.waiting or self.prefilling or self.running)
            self._drain(block=not busy)
            if self._stop.is_set():
                break
            if self._can_run() and (self.waiting or self.prefilling or self.running):
                try:
                    self._step()
                except Exception as exc:
                    logger.exception("engine step failed; aborting the requests in flight")
                    self._abort(None, f"engine error: {type(exc).__name__}: {exc}")
                self.last_step_at = time.monotonic()
            self._publish_gauges()

    def _drain(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.05) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        item()
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            item()

    def _can_run(self) -> bool:
        return not self.paused and not self.released and self.kv is not None

    def _publish_gauges(self) -> None:
        metrics.RUNNING.set(len(self.running) + len(self.prefilling))
        metrics.WAITING.set(len(self.waiting))
        capacity = self.limits.max_running_requests * self.limits.context_length
        metrics.KV_USAGE.set(sum(len(s.all_ids) for s in self.running) / capacity if capacity else 0.0)

    # ------------------------------------------------------------------ request bookkeeping

    def _add(self, req: EngineRequest) -> None:
        seed = req.params.sampling_seed if req.params.sampling_seed is not None else self._rng.getrandbits(63)
        seq = Sequence(req=req, all_ids=list(req.input_ids), seed=seed)
        seq.want_input_logprobs = req.return_logprob and req.logprob_start_len >= 0
        if req.top_logprobs_num > 0:
            seq.top_logprobs = []
        metrics.PROMPT_TOKENS.inc(len(req.input_ids))
        self.waiting.append(seq)

    def _abort(self, rid: str | None, message: str) -> None:
        reason = {"type": "abort", "message": message}
        for seq in [*self.running, *self.prefilling, *self.waiting]:
            if rid is None or seq.rid == rid:
                self._finish(seq, reason)

    def _retract_all(self) -> None:
        """Drop every sequence's cached keys/values and queue it again; it resumes by prefilling its tokens."""
        for seq in reversed([*self.running, *self.prefilling]):
            seq.num_computed = 0
            seq.stage = None
            if seq.want_input_logprobs:
                seq.input_logprobs = None
            self.waiting.appendleft(seq)
        self.running.clear()
        self.prefilling.clear()

    def _finish(self, seq: Sequence, reason: dict[str, Any]) -> None:
        seq.finish_reason = reason
        if seq in self.running:
            self._remove_running(seq)
        elif seq in self.prefilling:
            self.prefilling.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.stage = None
        if self.on_policy is not None and seq.req.return_logprob and seq.output_ids:
            self._on_policy_log_probs(seq)
        metrics.REQUESTS.labels(reason["type"]).inc()
        metrics.E2E_LATENCY.observe(time.perf_counter() - seq.arrived_at)
        self._emit(seq)

    def _on_policy_log_probs(self, seq: Sequence) -> None:
        """Replace the batched pass's output log-probs by the batch-invariant ones (true on-policy mode)."""
        if self._weight_backup is not None:
            # A request aborted while the weights are released keeps the log-probs it was sampled with.
            logger.warning(
                "request %s finished with the weights released; its log-probs are not rescored", seq.rid
            )
            return
        seq.logprobs = self.on_policy.output_log_probs(
            seq.all_ids, len(seq.output_ids), seq.req.params.temperature
        )

    def _remove_running(self, seq: Sequence) -> None:
        """Keep running sequences in slots ``0..n-1``: the last one moves into the freed slot."""
        self._remove_running_many([seq])

    def _remove_running_many(self, done: list[Sequence]) -> None:
        """Take ``done`` out of the running batch at once: the survivors beyond the new batch size move into the
        freed slots below it, in one copy (one at a time, a step's finishers moved survivors that were finishing too).
        """
        gone = {id(seq) for seq in done}
        size = len(self.running) - sum(id(seq) in gone for seq in self.running)
        holes = [i for i in range(size) if id(self.running[i]) in gone]
        movers = [i for i in range(size, len(self.running)) if id(self.running[i]) not in gone]
        if movers and self.kv is not None:
            self.kv.move_slots(movers, holes, max(self.running[i].num_computed for i in movers))
        for hole, mover in zip(holes, movers, strict=True):
            self.running[hole] = self.running[mover]
        del self.running[size:]

    def _emit(self, seq: Sequence) -> None:
        snapshot = Snapshot(
            rid=seq.rid,
            prompt_tokens=len(seq.req.input_ids),
            cached_tokens=seq.cached_tokens,
            output_ids=list(seq.output_ids),
            output_logprobs=list(seq.logprobs),
            output_top_logprobs=list(seq.top_logprobs) if seq.top_logprobs is not None else None,
            input_logprobs=seq.input_logprobs,
            finish_reason=seq.finish_reason,
            weight_version=self.weight_version,
            created=seq.req.created,
            finished_at=time.time() if seq.finish_reason is not None else None,
        )
        try:
            seq.req.on_event(snapshot)
        except Exception:
            logger.exception("delivering the output of request %s failed", seq.rid)

    # ------------------------------------------------------------------ one iteration

    def _step(self) -> None:
        segments, completing = self._plan_prefill()
        decode = list(self.running)
        if not decode and not segments:
            return
        # Completing prompts join after the decode rows; a row writes below its sequence's length (slot moves on
        # a finish go to lower slots, from higher ones already counted).
        self.kv.touch(
            len(decode) + len(completing), max((len(s.all_ids) for s in (*decode, *completing)), default=0)
        )
        input_lp_rows: dict[str, tuple[int, int, int]] = {}
        if self.graphs is not None and not segments and self.graphs.supports(len(decode)):
            ids = [s.all_ids[-1] for s in decode]
            logits = self.graphs.run(ids, [len(s.all_ids) - 1 for s in decode], self.kv)
        else:
            batch, logit_rows, input_lp_rows = self._build_batch(decode, segments)
            logits = self.model.forward(batch, self.kv, torch.tensor(logit_rows, device=self.model.device))
            for src, dst, length in batch.slot_copies:
                self.kv.move_slot(src, dst, length)

        for seq, _, _ in segments:
            if seq.rid in input_lp_rows:
                self._record_input_logprobs(seq, logits, input_lp_rows[seq.rid])
        n_decode = len(decode)
        samplers: list[Sequence] = list(decode)
        sample_rows = list(range(n_decode))
        for k, seq in enumerate(completing):
            if seq.req.params.max_new_tokens != 0:
                samplers.append(seq)
                sample_rows.append(n_decode + k)

        # Completed prefills join the running batch in the slots after the current ones.
        for seq in completing:
            self.prefilling.remove(seq)
            if seq.req.params.max_new_tokens == 0:
                seq.num_computed = len(seq.all_ids)
                self._finish(seq, {"type": "length", "length": 0})
                continue
            if seq.stage is not None:
                self.kv.store_stage(len(self.running), seq.stage, len(seq.all_ids))
                seq.stage = None
            seq.want_input_logprobs = False
            seq.num_computed = len(seq.all_ids)
            self.running.append(seq)

        if not samplers:
            return
        if sample_rows != list(range(len(sample_rows))):
            logits = logits[torch.tensor(sample_rows, device=logits.device)]
        want_top = max((s.req.top_logprobs_num for s in samplers), default=0)
        out = sample(logits[: len(samplers)], [self._sampling_row(s) for s in samplers], want_top)
        now = time.perf_counter()
        inter_token: float | None = None
        finished: list[tuple[Sequence, dict[str, Any]]] = []
        for i, seq in enumerate(samplers):
            token = out.tokens[i]
            seq.all_ids.append(token)
            seq.output_ids.append(token)
            seq.num_computed = len(seq.all_ids) - 1
            seq.logprobs.append(out.logprobs[i])
            if seq.top_logprobs is not None and out.top_logprobs is not None:
                seq.top_logprobs.append(out.top_logprobs[i][: seq.req.top_logprobs_num])
            if seq.first_token_at is None:
                seq.first_token_at = now
                metrics.TTFT.observe(now - seq.arrived_at)
            else:
                inter_token = now - seq.last_token_at
            seq.last_token_at = now
            reason = self._finish_reason(seq)
            if reason is not None:
                finished.append((seq, reason))
        metrics.GENERATION_TOKENS.inc(len(samplers))
        if inter_token is not None:
            # Every running sequence waited the same step for its token: one observation per decode step.
            metrics.ITL.observe(inter_token)
        self._remove_running_many([seq for seq, _ in finished])
        for seq, reason in finished:
            self._finish(seq, reason)
        for seq in samplers:
            if seq.finish_reason is None and seq.req.stream:
                self._emit(seq)

    def _plan_prefill(self) -> tuple[list[tuple[Sequence, int, int]], list[Sequence]]:
        """Choose prompt chunks for this iteration: unfinished prefills first, then new admissions.

        A prompt identical to one prefilled whole in this iteration costs no budget: ``_build_batch`` copies that
        one's keys/values instead of computing them again."""
        budget = self.limits.chunked_prefill_size
        seen: set[tuple[int, ...]] = set()
        pending = sum(self._prefill_cost(seq, seen) for seq in self.prefilling)
        while self.waiting and len(self.running) + len(self.prefilling) < self.limits.max_running_requests:
            if pending >= budget:
                break
            seq = self.waiting.popleft()
            self.prefilling.append(seq)
            pending += self._prefill_cost(seq, seen)
        segments: list[tuple[Sequence, int, int]] = []
        completing: list[Sequence] = []
        whole: set[tuple[int, ...]] = set()
        for seq in self.prefilling:
            remaining = len(seq.all_ids) - seq.num_computed
            if self._shareable(seq) and tuple(seq.all_ids) in whole:
                segments.append((seq, 0, remaining))
                completing.append(seq)
                continue
            if budget <= 0:
                continue
            length = min(remaining, budget)
            segments.append((seq, seq.num_computed, length))
            budget -= length
            if length == remaining:
                completing.append(seq)
                if self._shareable(seq):
                    whole.add(tuple(seq.all_ids))
            elif seq.stage is None:
                # Only a prompt that takes several iterations needs a staging buffer.
                seq.stage = StageCache(self.model.cfg, len(seq.all_ids), self.model.dtype, self.model.device)
        return segments, completing

    @staticmethod
    def _shareable(seq: Sequence) -> bool:
        """Whether ``seq``'s prompt may take an identical prompt's keys/values (not when its own prompt
        log-probs are asked for, or once its prefill has begun)."""
        return seq.num_computed == 0 and seq.stage is None and not seq.want_input_logprobs

    def _prefill_cost(self, seq: Sequence, seen: set[tuple[int, ...]]) -> int:
        if self._shareable(seq):
            key = tuple(seq.all_ids)
            if key in seen:
                return 0
            seen.add(key)
        return len(seq.all_ids) - seq.num_computed

    def _build_batch(
        self, decode: list[Sequence], segments: list[tuple[Sequence, int, int]]
    ) -> tuple[ForwardBatch, list[int], dict[str, tuple[int, int, int]]]:
        device = self.model.device
        ids: list[int] = [s.all_ids[-1] for s in decode]
        positions: list[int] = [len(s.all_ids) - 1 for s in decode]
        batch = ForwardBatch(input_ids=torch.empty(0), positions=torch.empty(0), num_decode=len(decode))
        if decode:
            batch.decode_len = max(positions) + 1
        logit_rows = list(range(len(decode)))
        # Completing prompts join the running batch in order, in the slots after the decode rows.
        next_slot = len(decode)
        tail_rows: list[int] = []
        input_lp_rows: dict[str, tuple[int, int, int]] = {}
        # A whole prompt identical to one already in this batch (a GRPO group's samples) is not computed again:
        # after the forward its keys/values are copied from that one's slot and it samples from the same logits.
        whole_prompts: dict[tuple[int, ...], tuple[int, int]] = {}
        for seq, start, length in segments:
            if start == 0 and length == len(seq.all_ids) and self._shareable(seq):
                key = tuple(seq.all_ids)
                first = whole_prompts.get(key)
                if first is not None:
                    first_slot, first_row = first
                    batch.slot_copies.append((first_slot, next_slot, length))
                    logit_rows.append(first_row)
                    next_slot += 1
                    seq.num_computed = length
                    seq.cached_tokens = length
                    metrics.CACHED_PROMPT_TOKENS.inc(length)
                    continue
                whole_prompts[key] = (next_slot, len(ids) + length - 1)
            offset = len(ids)
            ids.extend(seq.all_ids[start : start + length])
            positions.extend(range(start, start + length))
            if seq.stage is None:
                # Whole in this iteration: straight into the slot it joins the running batch in.
                batch.segments.append(PrefillSegment(offset, length, start, slot=next_slot))
            else:
                batch.segments.append(PrefillSegment(offset, length, start, stage=seq.stage))
            if start + length == len(seq.all_ids):
                next_slot += 1
            seq.num_computed = start + length
            if seq.want_input_logprobs:
                # Logits at prompt position p score token p + 1; rows for this chunk are appended after the tails.
                lo = max(seq.req.logprob_start_len, 1) - 1
                first, last = max(lo, start), min(len(seq.req.input_ids) - 1, start + length)
                if first < last:
                    input_lp_rows[seq.rid] = (len(tail_rows), first, last)
                    tail_rows.extend(range(offset + first - start, offset + last - start))
            if start + length == len(seq.all_ids):
                logit_rows.append(offset + length - 1)
        # Each completing segment's sampling row sits at n_decode + k; input-logprob rows follow all of them.
        base = len(logit_rows)
        input_lp_rows = {rid: (base + i, first, last) for rid, (i, first, last) in input_lp_rows.items()}
        logit_rows.extend(tail_rows)
        batch.input_ids = torch.tensor(ids, device=device)
        batch.positions = torch.tensor(positions, device=device)
        if decode:
            key_pos = torch.arange(batch.decode_len, device=device)
            pos = batch.positions[: len(decode)].unsqueeze(1)
            mask = torch.zeros(len(decode), batch.decode_len, device=device)
            batch.decode_mask = mask.masked_fill(key_pos.unsqueeze(0) > pos, float("-inf"))
        return batch, logit_rows, input_lp_rows

    def _record_input_logprobs(
        self, seq: Sequence, logits: torch.Tensor, where: tuple[int, int, int]
    ) -> None:
        """Teacher-forced log-probs of this chunk's prompt tokens (from ``logprob_start_len``; position 0 has none)."""
        row0, first, last = where
        prompt = seq.req.input_ids
        if seq.input_logprobs is None:
            seq.input_logprobs = [(None, prompt[0])] if seq.req.logprob_start_len == 0 else []
        temperature = seq.req.params.temperature or 1.0
        scores = torch.log_softmax(logits[row0 : row0 + (last - first)] / temperature, dim=-1)
        targets = torch.tensor(prompt[first + 1 : last + 1], device=scores.device)
        values = scores.gather(1, targets.unsqueeze(1)).squeeze(1).tolist()
        seq.input_logprobs.extend(zip(values, prompt[first + 1 : last + 1], strict=True))

    def _sampling_row(self, seq: Sequence) -> SamplingRow:
        p = seq.req.params
        banned: tuple[int, ...] = ()
        if len(seq.output_ids) < p.min_new_tokens:
            banned = tuple(sorted(p.stop_token_ids | (frozenset() if p.ignore_eos else self.eos_token_ids)))
        return SamplingRow(
            temperature=p.temperature,
            top_p=p.top_p,
            top_k=p.top_k,
            min_p=p.min_p,
            seed=seq.seed,
            step=len(seq.output_ids),
            banned=banned,
        )

    def _finish_reason(self, seq: Sequence) -> dict[str, Any] | None:
        """SGLang's order of checks: length first, then stop tokens (unless ignore_eos), then stop strings."""
        p = seq.req.params
        n = len(seq.output_ids)
        if p.max_new_tokens is not None and n >= p.max_new_tokens:
            return {"type": "length", "length": p.max_new_tokens}
        token = seq.output_ids[-1]
        if not p.ignore_eos and (token in p.stop_token_ids or token in self.eos_token_ids):
            return {"type": "stop", "matched": token}
        if p.stop:
            tail = self._decode_tail(seq.output_ids[-(self._stop_token_lengths(p.stop) + 1) :])
            for stop in p.stop:
                if stop in tail:
                    return {"type": "stop", "matched": stop}
        if len(seq.all_ids) >= self.limits.context_length:
            return {"type": "length", "length": n}
        return None

    # ------------------------------------------------------------------ memory

    def _new_kv_cache(self) -> KVCache:
        return KVCache(
            self.model.cfg,
            self.limits.max_running_requests,
            self.limits.context_length,
            self.model.dtype,
            self.model.device,
        )

    def _offload_weights(self) -> list[torch.Tensor]:
        """Move every weight to (pinned) host memory and free its device storage."""
        backup = []
        for tensor in self.model.tensors():
            if tensor.device.type == "cuda":
                host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
                host.copy_(tensor)
            else:
                # On a CPU engine the host is the device: keep the storage itself, only detach it from the model.
                host = tensor.data
            backup.append(host)
            tensor.data = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
        return backup

    def _restore_weights(self, backup: list[torch.Tensor]) -> None:
        for tensor, host in zip(self.model.tensors(), backup, strict=True):
            tensor.data = host.to(self.model.device)
