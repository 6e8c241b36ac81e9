"""The rollout task message: one prompt group the trainer puts on the run's task stream for the rollout workers.

Stream ``slime:<run>:tasks`` (consumer group ``generators``), one entry per group, field ``task`` = JSON
``{group_id, rollout_id, samples: [Sample.to_dict()...], sampling_params, weight_version, task_type, evaluation}``.
docs/buffer.md describes it in full.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson
import redis.asyncio as aioredis

from services.core.redis_util import StreamQueue, key
from services.core.sample import Sample

TASK_STREAM = "tasks"
TASK_GROUP = "generators"
TASK_FIELD = "task"


class BadTask(ValueError):
    """A stream entry that is not a valid task; the message names the field."""


@dataclass
class RolloutTask:
    group_id: str
    rollout_id: int
    samples: list[Sample]
    sampling_params: dict[str, Any] = field(default_factory=dict)
    weight_version: int | str | None = None
    task_type: str = ""
    evaluation: bool = False
    # Which start of the run's driver submitted it (0 for the first): a driver that resumes from a checkpoint
    # generates its rollouts again, and what its killed predecessor generated and trained on (acknowledged, so
    # gone from the buffer) must not count as already written.
    attempt: int = 0

    @property
    def generation(self) -> str:
        """The rollout (and, after a restart, the driver's attempt) this task generates for."""
        return f"{self.rollout_id}" if self.attempt == 0 else f"{self.rollout_id}.{self.attempt}"

    @property
    def token(self) -> str:
        """Identity of this task's result: a retried task writes nothing new, a later rollout's task (or a restarted
        driver's) does."""
        return f"{self.group_id}@{self.generation}"

    def to_fields(self) -> dict[str, str]:
        body = {
            "group_id": self.group_id,
            "rollout_id": self.rollout_id,
            "samples": [sample.to_dict() for sample in self.samples],
            "sampling_params": self.sampling_params,
            "weight_version": self.weight_version,
            "task_type": self.task_type,
            "evaluation": self.evaluation,
            "attempt": self.attempt,
        }
        return {TASK_FIELD: orjson.dumps(body).decode()}

    @classmethod
    def from_fields(cls, fields: dict[str, str]) -> RolloutTask:
        raw = fields.get(TASK_FIELD)
        if raw is None:
            raise BadTask(f"stream entry has no {TASK_FIELD!r} field (fields: {sorted(fields)})")
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise BadTask(f"task: malformed JSON: {exc}") from None
        if not isinstance(body, dict):
            raise BadTask("task: must be a JSON object")
        group_id = body.get("group_id")
        if not isinstance(group_id, str | int) or isinstance(group_id, bool) or str(group_id) == "":
            raise BadTask("task.group_id: required, a non-empty string or integer")
        rollout_id = body.get("rollout_id", 0)
        if not isinstance(rollout_id, int) or isinstance(rollout_id, bool):
            raise BadTask(f"task.rollout_id: must be an integer, got {rollout_id!r}")
        raw_samples = body.get("samples")
        if not isinstance(raw_samples, list) or not raw_samples:
            raise BadTask("task.samples: required, a non-empty list of Sample dicts")
        samples = []
        for i, sample in enumerate(raw_samples):
            if not isinstance(sample, dict):
                raise BadTask(f"task.samples[{i}]: must be a Sample dict")
            try:
                samples.append(Sample.from_dict(sample))
            except (TypeError, ValueError) as exc:
                raise BadTask(f"task.samples[{i}]: {exc}") from None
        params = body.get("sampling_params") or {}
        if not isinstance(params, dict):
            raise BadTask("task.sampling_params: must be an object of SGLang sampling parameters")
        attempt = body.get("attempt", 0)
        if not isinstance(attempt, int) or isinstance(attempt, bool) or attempt < 0:
            raise BadTask(f"task.attempt: must be a non-negative integer, got {attempt!r}")
        weight_version = body.get("weight_version")
        if weight_version is not None and not isinstance(weight_version, int | str):
            raise BadTask("task.weight_version: must be an integer, a string or null")
        return cls(
            group_id=str(group_id),
            rollout_id=rollout_id,
            samples=samples,
            sampling_params=params,
            weight_version=weight_version,
            task_type=str(body.get("task_type") or ""),
            evaluation=bool(body.get("evaluation", False)),
            attempt=attempt,
        )


def task_queue(redis_client: aioredis.Redis, run_id: str) -> StreamQueue:
    """The run's task stream, read through the rollout workers' consumer group."""
    return StreamQueue(redis_client, key(run_id, TASK_STREAM), TASK_GROUP)


async def submit_tasks(redis_client: aioredis.Redis, run_id: str, tasks: list[RolloutTask]) -> list[str]:
    """Put tasks on the run's stream (the trainer's side); returns the entry ids."""
    queue = task_queue(redis_client, run_id)
    await queue.ensure_group()
    return await queue.add_many([task.to_fields() for task in tasks])
