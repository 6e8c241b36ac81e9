"""The default rollout: prompt groups go to Redis as tasks, rollout workers generate and score them, and the
trainer leases the scored groups back from the rollout buffer.

This is slime's ``generate_rollout`` (``slime.rollout.sglang_rollout``) with the generation moved out of the trainer:
over-sampling (``--over-sampling-batch-size``), the dynamic-sampling filter, abort once the batch is full, and
``--partial-rollout`` keep slime's semantics. Groups are acknowledged to the buffer only after the trainer has used
them (``RolloutContext.ack_consumed``), so a trainer that dies mid-step loses nothing.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx
import redis.asyncio as aioredis

from rollout_buffer.client import BufferClient, FetchedGroup
from rollout_buffer.tasks import RolloutTask, submit_tasks, task_queue
from services.core.async_runner import AsyncRunner
from services.core.plugins import load_function
from services.core.sample import Sample
from trainer.data import DatasetKeys, PromptDataset, RolloutDataSource
from trainer.rollout.base_types import RolloutFnEvalOutput, RolloutFnTrainOutput
from trainer.rollout.distributed_post import live_posters, warn_if_single_poster
from trainer.rollout.filters import DynamicFilterOutput

logger = logging.getLogger(__name__)

EVAL_QUEUE = "eval"
TRAIN_QUEUE = "train"


def group_id_for(rollout_id: int, group_index: int | None, evaluation: bool = False) -> str:
    """Group ids carry their rollout, so a group that lands after its rollout ended is recognised as late."""
    return f"{'e' if evaluation else 'r'}{rollout_id}-g{group_index}"


def rollout_of(group_id: str) -> int | None:
    head = group_id.split("-", 1)[0]
    return int(head[1:]) if head[:1] in ("r", "e") and head[1:].isdigit() else None


def train_sampling_params(args: Any) -> dict[str, Any]:
    """slime's base sampling parameters for training rollouts."""
    return {
        "temperature": args.rollout_temperature,
        "top_p": args.rollout_top_p,
        "top_k": args.rollout_top_k,
        "max_new_tokens": args.rollout_max_response_len,
        "stop": args.rollout_stop,
        "stop_token_ids": args.rollout_stop_token_ids,
        "skip_special_tokens": args.rollout_skip_special_tokens,
        "no_stop_trim": True,
        "spaces_between_special_tokens": False,
    }


def eval_sampling_params(args: Any) -> dict[str, Any]:
    """Training parameters with the ``--eval-*`` overrides; ``--eval-min-new-tokens`` is applied (slime drops it)."""
    params = train_sampling_params(args)
    for key, flag in (
        ("temperature", "eval_temperature"),
        ("top_p", "eval_top_p"),
        ("top_k", "eval_top_k"),
        ("max_new_tokens", "eval_max_response_len"),
        ("min_new_tokens", "eval_min_new_tokens"),
    ):
        value = getattr(args, flag, None)
        if value is not None:
            params[key] = value
    return params


@dataclass
class RolloutContext:
    """Connections a queue-backed rollout needs; the driver creates one per run and installs it."""

    args: Any
    runner: AsyncRunner
    redis: aioredis.Redis
    router_url: str
    train_buffer: BufferClient
    eval_buffer: BufferClient
    weight_version: int = 0
    # This start of the run's driver, counted in Redis (0 for the first): see ``RolloutTask.attempt``.
    attempt: int = 0
    pending_acks: dict[int, list[str]] = field(default_factory=dict)
    eval_datasets: dict[str, PromptDataset] = field(default_factory=dict)
    tokenizer: Any = None
    dynamic_filter: Any = None

    def ack_consumed(self, rollout_id: int) -> int:
        """Acknowledge the groups rollout ``rollout_id`` handed to training, once trained on; they are deleted."""
        lease_ids = self.pending_acks.pop(rollout_id, [])
        return self.runner.run(self.train_buffer.ack(lease_ids)) if lease_ids else 0

    def close(self) -> None:
        async def _close() -> None:
            await self.train_buffer.aclose()
            await self.eval_buffer.aclose()
            await self.redis.aclose()

        self.runner.run(_close())


_CONTEXT: RolloutContext | None = None


def set_context(context: RolloutContext | None) -> None:
    global _CONTEXT
    _CONTEXT = context


def get_context() -> RolloutContext:
    if _CONTEXT is None:
        raise RuntimeError(
            "the queue-backed rollout runs inside `slime train`: no rollout context is installed in this process"
        )
    return _CONTEXT


def _keep(args: Any, fn: Any, group: list[Sample]) -> tuple[bool, str | None]:
    if fn is None:
        return True, None
    verdict = fn(args, group)
    if isinstance(verdict, DynamicFilterOutput):
        return verdict.keep, verdict.reason
    return bool(verdict), None


async def _abort_in_flight(ctx: RolloutContext, entry_ids: list[str]) -> None:
    """Drop the tasks no worker has started, and abort the generations that are running, as slime's ``abort``."""
    queue = task_queue(ctx.redis, ctx.args.run_id)
    if entry_ids:
        await ctx.redis.xdel(queue.stream, *entry_ids)
    try:
        async with httpx.AsyncClient(timeout=10.0, trust_env=False) as client:
            await client.post(f"{ctx.router_url}/abort_request", json={"abort_all": True})
    except httpx.HTTPError as exc:
        logger.warning("abort through the router failed: %s", exc)


async def _generate_train(
    ctx: RolloutContext, rollout_id: int, data_source: RolloutDataSource
) -> RolloutFnTrainOutput:
    args = ctx.args
    target = args.rollout_batch_size
    params = train_sampling_params(args)
    kept: list[list[Sample]] = []
    drops: Counter[str] = Counter()
    in_flight: dict[str, str] = {}
    late_groups = 0
    submitted = 0
    started = time.monotonic()
    while len(kept) < target:
        while len(kept) + len(in_flight) < target:
            groups = data_source.get_samples(args.over_sampling_batch_size)
            tasks = [
                RolloutTask(
                    group_id=group_id_for(rollout_id, group[0].group_index),
                    rollout_id=rollout_id,
                    samples=group,
                    sampling_params=params,
                    weight_version=ctx.weight_version,
                    task_type=args.rollout_task_type,
                    attempt=ctx.attempt,
                )
                for group in groups
            ]
            entry_ids = await submit_tasks(ctx.redis, args.run_id, tasks)
            submitted += len(tasks)
            in_flight.update({task.group_id: entry for task, entry in zip(tasks, entry_ids, strict=True)})
        fetched: list[FetchedGroup] = await ctx.train_buffer.lease(len(in_flight))
        for group in fetched:
            samples = group.to_samples()
            if group.group_id not in in_flight:
                late_groups += 1
                await _take_late_group(ctx, group, samples, data_source)
                continue
            del in_flight[group.group_id]
            keep, reason = _keep(args, ctx.dynamic_filter, samples)
            if not keep:
                drops[reason or "filtered"] += 1
            if keep and len(kept) < target:
                kept.append(samples)
                ctx.pending_acks.setdefault(rollout_id, []).append(group.lease_id)
            else:
                await ctx.train_buffer.ack([group.lease_id])
    if in_flight:
        await _abort_in_flight(ctx, list(in_flight.values()))
    kept.sort(key=lambda g: g[0].index if g[0].index is not None else 0)
    metrics: dict[str, Any] = {f"rollout/dynamic_filter/drop_{reason}": n for reason, n in drops.items()}
    metrics["rollout/late_groups"] = late_groups
    metrics["perf/rollout_time"] = time.monotonic() - started
    posters = await live_posters(ctx.redis, args.run_id)
    metrics["perf/rollout_workers"] = len(posters)
    warn_if_single_poster(args, posters, submitted)
    return RolloutFnTrainOutput(samples=kept, metrics=metrics)


async def _take_late_group(
    ctx: RolloutContext, group: FetchedGroup, samples: list[Sample], data_source: RolloutDataSource
) -> None:
    """A group from an earlier rollout that finished after its abort: with ``--partial-rollout`` it returns to the
    data source to be continued (slime's partial rollout); otherwise it is dropped."""
    if ctx.args.partial_rollout and len(samples) == ctx.args.n_samples_per_prompt:
        origin = rollout_of(group.group_id)
        for sample in samples:
            if sample.response:
                sample.metadata.setdefault("start_rollout_id", origin)
        data_source.add_samples([samples])
    await ctx.train_buffer.ack([group.lease_id])


def generate_rollout(
    args: Any, rollout_id: int, data_source: RolloutDataSource, evaluation: bool = False
) -> RolloutFnTrainOutput | RolloutFnEvalOutput:
    """slime's ``--rollout-function-path`` contract: one training batch of ``--rollout-batch-size`` groups, or an
    evaluation of every ``--eval-prompt-data`` dataset."""
    ctx = get_context()
    if evaluation:
        return eval_rollout(args, rollout_id)
    if ctx.dynamic_filter is None and args.dynamic_sampling_filter_path:
        ctx.dynamic_filter = load_function(
            args.dynamic_sampling_filter_path, flag="--dynamic-sampling-filter-path"
        )
    return ctx.runner.run(_generate_train(ctx, rollout_id, data_source))


def _eval_dataset(ctx: RolloutContext, name: str, path: str) -> PromptDataset:
    if name not in ctx.eval_datasets:
        args = ctx.args
        keys = DatasetKeys(
            input_key=args.eval_input_key or args.input_key,
            label_key=args.eval_label_key or args.label_key,
            metadata_key=args.metadata_key,
            tool_key=args.eval_tool_key or args.tool_key,
            multimodal_keys=args.multimodal_keys,
        )
        ctx.eval_datasets[name] = PromptDataset(
            path,
            keys=keys,
            tokenizer=ctx.tokenizer,
            apply_chat_template=args.apply_chat_template,
            max_prompt_len=args.rollout_max_prompt_len,
            seed=args.rollout_seed,
        )
    return ctx.eval_datasets[name]


async def _eval_one(
    ctx: RolloutContext, rollout_id: int, name: str, dataset: PromptDataset
) -> dict[str, Any]:
    args = ctx.args
    params = eval_sampling_params(args)
    n = args.n_samples_per_eval_prompt
    tasks = []
    for i in range(len(dataset)):
        record = dataset.records[i]
        samples = [
            Sample(
                uid=f"eval-{name}-{rollout_id}-{i}-{j}",
                group_index=i,
                index=i * n + j,
                prompt=record.prompt,
                label=record.label,
                metadata=dict(record.metadata),
            )
            for j in range(n)
        ]
        tasks.append(
            RolloutTask(
                group_id=group_id_for(rollout_id, i, evaluation=True) + f"-{name}",
                rollout_id=rollout_id,
                samples=samples,
                sampling_params={**params, "sampling_seed": args.rollout_seed},
                weight_version=ctx.weight_version,
                task_type=args.rollout_task_type,
                evaluation=True,
                attempt=ctx.attempt,
            )
        )
    await submit_tasks(ctx.redis, args.run_id, tasks)
    wanted = {task.group_id for task in tasks}
    groups: dict[str, list[Sample]] = {}
    while len(groups) < len(wanted):
        fetched = await ctx.eval_buffer.lease(len(wanted) - len(groups), min_groups=len(wanted) - len(groups))
        for group in fetched:
            if group.group_id in wanted:
                groups[group.group_id] = group.to_samples()
        await ctx.eval_buffer.ack([g.lease_id for g in fetched])
    ordered = [s for task in tasks for s in sorted(groups[task.group_id], key=lambda s: s.index or 0)]
    reward_key = args.eval_reward_key
    rewards = [
        s.reward[reward_key] if isinstance(s.reward, dict) and reward_key else s.reward for s in ordered
    ]
    return {
        "rewards": rewards,
        "truncated": [s.status is Sample.Status.TRUNCATED for s in ordered],
        "samples": ordered,
    }


def eval_rollout(args: Any, rollout_id: int) -> RolloutFnEvalOutput:
    """slime's ``eval_rollout``: every sample of every eval dataset, with the eval sampling overrides."""
    ctx = get_context()
    pairs = args.eval_prompt_data or []
    data = {}
    for name, path in zip(pairs[::2], pairs[1::2], strict=True):
        data[name] = ctx.runner.run(_eval_one(ctx, rollout_id, name, _eval_dataset(ctx, name, path)))
    return RolloutFnEvalOutput(data=data)
