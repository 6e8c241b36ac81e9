"""Rollout workers: consume the run's task stream as the consumer group ``generators``, generate every sample of a
group through the router, score it through the reward service and store the scored group, then acknowledge.

Delivery is at-least-once: a worker that dies leaves its tasks pending, and after ``--worker-reclaim-idle``
seconds of silence another worker takes them over (XAUTOCLAIM). A task's group is written once per
``group_id@rollout_id``, so a task finished twice still stores its samples once. Live workers refresh their
pending entries, so a long generation is not mistaken for a dead worker.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import logging
import os
import signal
import socket
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import orjson

from rollout_buffer import metrics
from rollout_buffer.arguments import parse_args
from rollout_buffer.generate import close_clients, generate, generate_fresh_batch, is_text_only
from rollout_buffer.store import (
    KIND_SAMPLE,
    QUEUE_EVAL,
    QUEUE_TRAIN,
    BufferFullError,
    BufferStore,
    NewItem,
    StoreLimits,
)
from rollout_buffer.tasks import BadTask, RolloutTask, task_queue
from services.core.logging_setup import setup_logging
from services.core.plugins import load_function
from services.core.redis_util import StreamEntry, key, redis_from_url
from services.core.sample import Sample

logger = logging.getLogger(__name__)

GenerateFn = Callable[[Any, Sample, dict[str, Any]], Awaitable[Sample | list[Sample]]]
DEFAULT_GENERATE = "slime.rollout.sglang_rollout.generate"
# A task delivered this many times without being finished is moved to the dead-letter stream.
MAX_DELIVERIES = 5
_FULL_RETRY_S = 1.0


class RewardScorer:
    """Scores samples the way the flags say: --custom-rm-path in this process (slime's precedence), else the
    reward service over gRPC (--reward-grpc-addr) or HTTP (--reward-url), else slime's rm_hub in this process."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self._grpc = None
        self._http = None
        if getattr(args, "custom_rm_path", None):
            return
        from services.reward_model import client

        if getattr(args, "reward_grpc_addr", None):
            self._grpc = client.RewardGrpcClient(args.reward_grpc_addr, auth_token=args.auth_token)
        elif getattr(args, "reward_url", None):
            self._http = client.RewardHttpClient(args.reward_url, auth_token=args.auth_token)

    async def score(self, samples: list[Sample], *, group: bool) -> None:
        """Set ``reward`` on each sample: one call per sample, or with ``group`` the whole list at once."""
        if not samples:
            return
        rm_type = getattr(self.args, "rm_type", None) or ""
        if self._grpc is not None:
            call = self._grpc.score_group if group else self._grpc.score
            outcomes = await call(samples, rm_type=rm_type)
        elif self._http is not None:
            outcomes = await self._http.score_batch(samples, rm_type=rm_type or None, group=group)
        else:
            from services.reward_model.hub import async_rm, batched_async_rm

            if group:
                values = await batched_async_rm(self.args, samples)
            else:
                values = await asyncio.gather(*(async_rm(self.args, sample) for sample in samples))
            for sample, value in zip(samples, values, strict=True):
                sample.reward = value
            return
        for sample, outcome in zip(samples, outcomes, strict=True):
            sample.reward = outcome.value
            if outcome.error:
                sample.metadata["reward_error"] = outcome.error
                logger.warning(
                    "reward of sample %s failed (%s); it gets %r", sample.uid, outcome.error, outcome.value
                )

    async def aclose(self) -> None:
        if self._grpc is not None:
            await self._grpc.close()
        if self._http is not None:
            await self._http.aclose()
        if self._grpc is None and self._http is None:
            from services.reward_model.hub import close_default_hub

            await close_default_hub()


def _generate_function(args: argparse.Namespace) -> GenerateFn:
    path = getattr(args, "custom_generate_function_path", None)
    if path:
        return load_function(path, flag="--custom-generate-function-path")
    return load_function(DEFAULT_GENERATE, flag="--custom-generate-function-path")


class RolloutWorker:
    """One consumer of the task stream, generating up to ``concurrency`` groups at a time."""

    def __init__(
        self,
        args: argparse.Namespace,
        store: BufferStore,
        *,
        run_id: str,
        concurrency: int,
        reclaim_idle_s: float,
        consumer: str | None = None,
    ):
        self.args = args
        self.store = store
        self.run_id = run_id
        self.concurrency = concurrency
        self.reclaim_idle_ms = max(1, int(reclaim_idle_s * 1000))
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.queue = task_queue(store.redis, run_id)
        self.generate_fn = _generate_function(args)
        self.scorer = RewardScorer(args)
        self._inflight: dict[str, asyncio.Task[None]] = {}

    async def run(self, stop: asyncio.Event) -> None:
        """Consume tasks until ``stop`` is set; unfinished tasks stay pending for another worker to reclaim."""
        # Listed in the group from the start, so that the other workers leave it its share of the first rollout.
        await self.queue.register(self.consumer)
        logger.info("rollout worker %s consuming %s", self.consumer, self.queue.stream)
        heartbeat = asyncio.create_task(self._heartbeat(stop))
        next_reclaim = 0.0
        try:
            while not stop.is_set():
                free = self.concurrency - len(self._inflight)
                if free <= 0:
                    await asyncio.wait(
                        set(self._inflight.values()), timeout=1.0, return_when=asyncio.FIRST_COMPLETED
                    )
                    continue
                entries: list[StreamEntry] = []
                if time.monotonic() >= next_reclaim:
                    entries = await self._reclaim(free)
                    next_reclaim = time.monotonic() + self.reclaim_idle_ms / 4000
                if len(entries) < free:
                    # No more than this worker's share of a rollout's tasks, so that several workers split it.
                    entries += await self.queue.read_share(
                        self.consumer, count=free - len(entries), block_ms=None if entries else 1000
                    )
                for entry in entries:
                    if entry.id not in self._inflight:
                        self._inflight[entry.id] = asyncio.create_task(self._process(entry))
                        self._inflight[entry.id].add_done_callback(
                            lambda _, i=entry.id: self._inflight.pop(i, None)
                        )
        finally:
            heartbeat.cancel()
            for task in list(self._inflight.values()):
                task.cancel()
            await asyncio.gather(heartbeat, *self._inflight.values(), return_exceptions=True)
            await self.scorer.aclose()
            await close_clients()

    async def _reclaim(self, count: int) -> list[StreamEntry]:
        claimed = await self.queue.reclaim(self.consumer, self.reclaim_idle_ms, count)
        live = []
        for entry in claimed:
            if entry.id in self._inflight:
                # Our own task, idle past the limit only because the heartbeat was late (a busy host): still live.
                continue
            pending = await self.store.redis.xpending_range(
                self.queue.stream, self.queue.group, min=entry.id, max=entry.id, count=1
            )
            deliveries = int(pending[0]["times_delivered"]) if pending else 1
            if deliveries > MAX_DELIVERIES:
                await self._dead_letter(entry, f"delivered {deliveries} times without finishing")
                metrics.WORKER_TASKS.labels("failed").inc()
                continue
            metrics.WORKER_RECLAIMED.inc()
            live.append(entry)
        return live

    async def _heartbeat(self, stop: asyncio.Event) -> None:
        """Reset the idle time of this worker's pending entries, so live work is not reclaimed."""
        interval = self.reclaim_idle_ms / 3000
        while not stop.is_set():
            await asyncio.sleep(interval)
            ids = list(self._inflight)
            if ids:
                with contextlib.suppress(Exception):
                    await self.store.redis.xclaim(
                        self.queue.stream, self.queue.group, self.consumer, 0, ids, justid=True
                    )

    async def _dead_letter(self, entry: StreamEntry, reason: str) -> None:
        logger.error("task %s moved to the dead-letter stream: %s", entry.id, reason)
        await self.store.redis.xadd(
            key(self.run_id, "tasks", "dead"), {**entry.fields, "entry_id": entry.id, "reason": reason}
        )
        await self.queue.ack([entry.id])

    async def _process(self, entry: StreamEntry) -> None:
        try:
            task = RolloutTask.from_fields(entry.fields)
        except BadTask as exc:
            metrics.WORKER_TASKS.labels("bad_task").inc()
            metrics.REJECTED.labels("bad_task").inc()
            await self._dead_letter(entry, str(exc))
            return
        try:
            if await self.store.group_done(self.run_id, task.token):
                outcome = "duplicate"
            else:
                samples = await self.rollout_group(task)
                outcome = await self._store(task, samples)
            await self.queue.ack([entry.id])
            metrics.WORKER_TASKS.labels(outcome).inc()
        except asyncio.CancelledError:
            raise
        except Exception:
            # Left pending: this or another worker reclaims it once it has been idle for the reclaim time.
            logger.exception("task %s (group %s) failed; it will be retried", entry.id, task.group_id)
            metrics.WORKER_TASKS.labels("failed").inc()

    async def rollout_group(self, task: RolloutTask) -> list[Sample]:
        """Generate every sample of the group (continuing partial ones) and score them, as slime's
        ``generate_and_rm_group`` does."""
        group_rm = bool(getattr(self.args, "group_rm", False))
        batched = self._fresh_batch(task)
        singles = [i for i in range(len(task.samples)) if i not in batched]
        jobs = [self._generate_and_rm(task, task.samples[i], i, group_rm) for i in singles]
        if batched:
            jobs.append(self._generate_batch_and_rm(task, batched, group_rm))
        results = await asyncio.gather(*jobs)
        # In the group's order, whichever way each sample was generated.
        by_index: dict[int, Sample | list[Sample]] = dict(zip(singles, results, strict=False))
        if batched:
            by_index.update(zip(batched, results[-1], strict=True))
        ordered = [by_index[i] for i in range(len(task.samples))]
        samples = [s for result in ordered for s in (result if isinstance(result, list) else [result])]
        if group_rm and not any(s.status is Sample.Status.ABORTED for s in samples):
            await self.scorer.score(samples, group=True)
        return samples

    def _fresh_batch(self, task: RolloutTask) -> list[int]:
        """Indices of the group's samples that go to the engines as one batched request: with slime's default
        generate, the fresh text-only samples, when there are at least two."""
        if self.generate_fn is not generate:
            return []
        fresh = [
            i
            for i, sample in enumerate(task.samples)
            if sample.status is Sample.Status.PENDING and not sample.response and is_text_only(sample)
        ]
        return fresh if len(fresh) > 1 else []

    def _sampling_params(self, task: RolloutTask, index: int) -> dict:
        params = copy.deepcopy(task.sampling_params)
        if getattr(self.args, "sglang_enable_deterministic_inference", False):
            params["sampling_seed"] = self.args.rollout_seed + index
        elif params.get("sampling_seed") is not None:
            # A task's seed (evaluation sets one, for answers that repeat across evaluations) is the group's:
            # one seed for every sample would give the n samples of a prompt the same answer.
            params["sampling_seed"] = int(params["sampling_seed"]) + index
        return params

    async def _generate_batch_and_rm(
        self, task: RolloutTask, indices: list[int], group_rm: bool
    ) -> list[Sample]:
        samples = [task.samples[i] for i in indices]
        await generate_fresh_batch(self.args, samples, [self._sampling_params(task, i) for i in indices])
        if not group_rm:
            await self.scorer.score(
                [s for s in samples if s.status is not Sample.Status.ABORTED], group=False
            )
        return samples

    async def _generate_and_rm(
        self, task: RolloutTask, sample: Sample, index: int, group_rm: bool
    ) -> Sample | list[Sample]:
        if sample.status in (Sample.Status.COMPLETED, Sample.Status.TRUNCATED):
            return sample
        params = self._sampling_params(task, index)
        result = await self.generate_fn(self.args, sample, params)
        if group_rm:
            return result
        if isinstance(result, list):
            await self.scorer.score([s for s in result if s.reward is None], group=True)
        elif result.status is not Sample.Status.ABORTED:
            await self.scorer.score([result], group=False)
        return result

    async def _store(self, task: RolloutTask, samples: Sequence[Sample]) -> str:
        items = [
            NewItem(
                # The rollout id in the idempotency key: a partial sample continued in a later rollout is new.
                uid=f"{sample.uid}@{task.generation}",
                instance_id=task.group_id,
                payload=orjson.dumps(sample.to_dict()),
                kind=KIND_SAMPLE,
                queue=QUEUE_EVAL if task.evaluation else QUEUE_TRAIN,
                group_size=len(samples),
            )
            for sample in samples
        ]
        while True:
            try:
                result = await self.store.write(
                    self.run_id, items, seal_by_size=True, group_token=task.token, task_type=task.task_type
                )
                break
            except BufferFullError as exc:
                # Backpressure: the trainer has not acknowledged enough yet; wait rather than drop the group.
                logger.info("buffer full (%s); group %s waits", exc, task.group_id)
                await asyncio.sleep(_FULL_RETRY_S)
        metrics.WRITES.labels("worker").inc(result.stored)
        metrics.DUPLICATES.labels("worker").inc(result.duplicates)
        metrics.GROUPS_SEALED.inc(len(result.sealed))
        return "stored" if result.stored else "duplicate"


async def run_worker(args: argparse.Namespace, stop: asyncio.Event) -> None:
    redis_client = redis_from_url(args.redis_url)
    limits = StoreLimits(
        group_size=args.n_samples_per_prompt,
        max_items=args.buffer_max_items,
        max_bytes=args.buffer_max_bytes,
        dedup_ttl_s=args.dedup_ttl,
        lease_timeout_s=args.lease_timeout,
    )
    store = BufferStore(redis_client, limits, redis_url=args.redis_url)
    worker = RolloutWorker(
        args,
        store,
        run_id=args.run_id,
        concurrency=args.worker_concurrency,
        reclaim_idle_s=args.worker_reclaim_idle,
    )
    try:
        await worker.run(stop)
    finally:
        await store.aclose()
        await redis_client.aclose()


def main(argv: Sequence[str] | None = None) -> int:
    """One rollout worker process (``python -m rollout_buffer.workers``, takes the buffer's flags)."""
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    setup_logging(args.log_level, service="rollout-worker")
    if not args.redis_url:
        logger.error(
            "a rollout worker needs --redis-url: the Redis of the buffer and the trainer's task stream"
        )
        return 2

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await run_worker(args, stop)

    try:
        asyncio.run(serve())
    except ValueError as exc:
        logger.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
