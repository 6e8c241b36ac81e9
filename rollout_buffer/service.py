"""The buffer's behaviour behind every API (slime's, v1 and gRPC): writing trajectories with the task's group
rule, reading complete groups with the task's hooks, run ids, and the periodic expiry and gauge refresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from rollout_buffer import metrics
from rollout_buffer.generators import Generator, GeneratorRegistry
from rollout_buffer.store import (
    KIND_TRAJECTORY,
    QUEUE_TRAIN,
    BufferFullError,
    BufferStore,
    Group,
    LeaseResult,
    NewItem,
    WriteResult,
)
from rollout_buffer.tasks import task_queue
from services.core.http_app import ApiError
from services.core.redis_util import key

logger = logging.getLogger(__name__)

# How long a cached run config (group size, task type) is trusted before it is read from Redis again.
_CONFIG_TTL_S = 1.0
_SEAL_ATTEMPTS = 5
_GENERATOR_LOCK_MS = 30_000
_RELEASE_IF_OWNER_LUA = (
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
)


@dataclass
class ServiceSettings:
    run_id: str = "default"
    task_type: str | None = "math"
    # How long a 429 asks the client to wait before retrying.
    retry_after_s: int = 1
    # Most groups one slime /get_rollout_data call returns.
    slime_read_max_groups: int = 100_000
    grpc_port: int | None = None


@dataclass
class _RunConfig:
    group_size: int
    task_type: str | None
    read_at: float = field(default_factory=time.monotonic)


def check_run_id(run_id: str) -> str:
    """``run_id`` itself when it can namespace Redis keys; else a 422 naming the field."""
    try:
        key(run_id)
    except ValueError as exc:
        raise ApiError(422, f"run_id: {exc}", field="run_id") from None
    return run_id


def default_meta_info(groups: dict[Any, list[dict[str, Any]]]) -> dict[str, Any]:
    """slime's default meta info of a read: sample and group counts, mean group size and mean reward."""
    total = sum(len(items) for items in groups.values())
    rewards = [
        item["reward"]
        for items in groups.values()
        for item in items
        if isinstance(item.get("reward"), int | float)
    ]
    return {
        "total_samples": total,
        "num_groups": len(groups),
        "avg_group_size": total / len(groups) if groups else 0,
        "avg_reward": sum(rewards) / len(rewards) if rewards else 0,
    }


class BufferService:
    """One per process: the store plus the task hooks, used by the HTTP routers, the gRPC servicer and workers."""

    def __init__(self, store: BufferStore, registry: GeneratorRegistry, settings: ServiceSettings):
        self.store = store
        self.registry = registry
        self.settings = settings
        self._configs: dict[str, _RunConfig] = {}
        self._runs: set[str] = {settings.run_id}
        self._background: set[asyncio.Task[None]] = set()

    def run_of(self, run_id: str | None) -> str:
        run = check_run_id(run_id) if run_id else self.settings.run_id
        self._runs.add(run)
        return run

    async def run_config(self, run_id: str) -> _RunConfig:
        cached = self._configs.get(run_id)
        if cached is not None and time.monotonic() - cached.read_at < _CONFIG_TTL_S:
            return cached
        size, task_type = await self.store.run_config(run_id)
        config = _RunConfig(size, task_type or self.settings.task_type)
        self._configs[run_id] = config
        return config

    async def generator_of(self, run_id: str) -> tuple[Generator | None, _RunConfig]:
        config = await self.run_config(run_id)
        return self.registry.get(config.task_type), config

    async def start_rollout(
        self, run_id: str, task_type: str, group_size: int, payload: dict[str, Any]
    ) -> bool:
        """Record the run's task type and group size (as slime's /start_rollout does), then start its generator
        unless one already runs for this run and task type in any process serving the run; False then."""
        await self.store.set_run_config(run_id, group_size=group_size, task_type=task_type)
        self._configs[run_id] = _RunConfig(group_size, task_type)
        lock = f"{self.store.prefix(run_id)}:generator:{task_type}"
        owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex}"
        if not await self.store.redis.set(lock, owner, nx=True, px=_GENERATOR_LOCK_MS):
            return False
        if not self.registry.start(task_type, payload):
            await self._release(lock, owner)
            return False
        holder = asyncio.create_task(self._hold_generator_lock(lock, owner, task_type))
        self._background.add(holder)
        holder.add_done_callback(self._background.discard)
        return True

    async def _hold_generator_lock(self, lock: str, owner: str, task_type: str) -> None:
        # The lock expires on its own if this process dies, so a later /start_rollout can start a new generator.
        try:
            while self.registry.is_running(task_type):
                await self.store.redis.pexpire(lock, _GENERATOR_LOCK_MS)
                await asyncio.sleep(_GENERATOR_LOCK_MS / 3000)
        finally:
            await self._release(lock, owner)

    async def _release(self, lock: str, owner: str) -> None:
        await self.store.redis.eval(_RELEASE_IF_OWNER_LUA, 1, lock, owner)

    async def write_trajectories(
        self,
        run_id: str,
        items: Sequence[dict[str, Any]],
        *,
        group_size: int | None,
        source: str,
        payloads: Sequence[bytes] | None = None,
    ) -> WriteResult:
        """Store validated trajectory dicts (verbatim) all-or-nothing; groups seal by size or by is_valid_group.

        ``payloads``: the items' JSON when the caller has it already (the request body itself).
        """
        generator, config = await self.generator_of(run_id)
        validator = generator.is_valid_group if generator is not None else None
        new_items = [
            NewItem(
                uid=item["uid"],
                instance_id=str(item["instance_id"]),
                payload=orjson.dumps(item) if payloads is None else payloads[i],
                kind=KIND_TRAJECTORY,
                queue=QUEUE_TRAIN,
                group_size=group_size or 0,
            )
            for i, item in enumerate(items)
        ]
        try:
            result = await self.store.write(
                run_id, new_items, seal_by_size=validator is None, task_type=config.task_type or ""
            )
        except BufferFullError as exc:
            metrics.child(metrics.REJECTED, "full").inc(len(items))
            raise ApiError(
                429,
                f"{exc}; retry after {self.settings.retry_after_s}s",
                field="items",
                headers={"Retry-After": str(self.settings.retry_after_s)},
            ) from None
        if result.stored:
            metrics.child(metrics.WRITES, source).inc(result.stored)
        if result.duplicates:
            metrics.child(metrics.DUPLICATES, source).inc(result.duplicates)
        sealed = len(result.sealed)
        if validator is not None:
            # Duplicates count as touches too: a client retrying after a crash between write and seal reseals.
            touched = {str(item["instance_id"]): item["instance_id"] for item in items}
            for instance_key, instance_id in touched.items():
                sealed += await self._seal_if_valid(
                    run_id,
                    instance_key,
                    instance_id,
                    validator,
                    group_size or config.group_size,
                    config.task_type,
                )
        if sealed:
            metrics.GROUPS_SEALED.inc(sealed)
        return result

    async def _seal_if_valid(
        self,
        run_id: str,
        instance_key: str,
        instance_id: Any,
        validator: Any,
        group_size: int,
        task_type: str | None,
    ) -> int:
        for _ in range(_SEAL_ATTEMPTS):
            items = await self.store.open_items(run_id, KIND_TRAJECTORY, instance_key)
            if not items or not validator((instance_id, items), group_size, task_type):
                return 0
            if (
                await self.store.seal_if_unchanged(run_id, KIND_TRAJECTORY, instance_key, len(items))
                is not None
            ):
                return 1
        return 0

    async def lease(self, run_id: str, max_groups: int, *, api: str, **kwargs: Any) -> LeaseResult:
        result = await self.store.lease_wait(run_id, max_groups, **kwargs)
        metrics.LEASES.labels(api).inc(len(result.groups))
        metrics.LEASES_EXPIRED.inc(result.requeued)
        return result

    async def ack(self, run_id: str, lease_ids: Sequence[str], *, api: str) -> list[str]:
        acked = await self.store.ack(run_id, lease_ids)
        metrics.ACKS.labels(api).inc(len(acked))
        return acked

    async def transform(self, run_id: str, groups: list[Group]) -> list[tuple[Any, list[dict[str, Any]]]]:
        """Each trajectory group as slime's (instance_id, items), through the task's transform_group if any."""
        generator, config = await self.generator_of(run_id)
        hook = generator.transform_group if generator is not None else None
        out = []
        for group in groups:
            pair = (
                group.items[0].get("instance_id", group.instance_id) if group.items else group.instance_id,
                group.items,
            )
            if hook is not None and group.kind == KIND_TRAJECTORY:
                pair = hook(pair, config.task_type)
            out.append((pair[0], list(pair[1])))
        return out

    async def meta_info(self, run_id: str, groups: dict[Any, list[dict[str, Any]]]) -> dict[str, Any]:
        generator, _ = await self.generator_of(run_id)
        hook = generator.get_group_data_meta_info if generator is not None else None
        return dict(hook(groups) if hook is not None else default_meta_info(groups))

    async def task_queue_depths(self, run_id: str) -> tuple[int, int]:
        """(tasks queued and not yet read, tasks read and not yet acknowledged) on the run's task stream."""
        queue = task_queue(self.store.redis, run_id)
        stream = queue.stream
        if not await self.store.redis.exists(stream):
            return 0, 0
        pending = await queue.pending_count()
        queued = 0
        with contextlib.suppress(Exception):
            for info in await self.store.redis.xinfo_groups(stream):
                if info.get("name") == queue.group:
                    queued = int(info.get("lag") or 0)
        return queued, pending

    async def housekeeping_loop(self, interval_s: float = 1.0) -> None:
        """Expire idle open groups and refresh the gauges, for every run this process has served."""
        while True:
            for run_id in list(self._runs):
                try:
                    await self._housekeep(run_id)
                except Exception as exc:
                    logger.warning("housekeeping for run %s failed: %s", run_id, exc)
            await asyncio.sleep(interval_s)

    async def _housekeep(self, run_id: str) -> None:
        expired, _ = await self.store.expire_open_groups(run_id)
        if expired:
            action = self.store.limits.expiry_action
            metrics.EXPIRED_GROUPS.labels("delivered" if action == "deliver" else "dropped").inc(expired)
            logger.info("run %s: %d open groups hit the group timeout (%s)", run_id, expired, action)
        stats = await self.store.stats(run_id)
        queued, pending = await self.task_queue_depths(run_id)
        depth = metrics.QUEUE_DEPTH
        depth.labels(run_id, "open").set(stats.open_groups)
        depth.labels(run_id, "ready").set(sum(stats.ready_groups.values()))
        depth.labels(run_id, "leased").set(stats.leased_groups)
        depth.labels(run_id, "tasks_queued").set(queued)
        depth.labels(run_id, "tasks_pending").set(pending)
        metrics.HELD.labels(run_id, "items").set(stats.items)
        metrics.HELD.labels(run_id, "bytes").set(stats.bytes)
        metrics.LAG.labels(run_id).set(stats.oldest_ready_age_s or 0.0)
