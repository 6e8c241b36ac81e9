"""The buffer's HTTP wire models: a strict trajectory item (slime's shape), the v1 batch, lease, ack and stats
bodies, and one body parser that turns bad JSON or a bad field into a 422 naming the field.
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

import orjson
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from rollout_buffer import metrics
from rollout_buffer.store import KINDS, QUEUE_TRAIN
from services.core.wire import TrajectoryItem, TrajectoryMessage

Model = TypeVar("Model", bound=BaseModel)


class Message(TrajectoryMessage):
    """A chat message: ``role`` and ``content`` are both required (content may be null for a pure tool call)."""

    content: str | list[dict[str, Any]] | None


class Trajectory(TrajectoryItem):
    """slime's trajectory item, checked strictly: no number parsed out of a string, no bool taken for a reward."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False, coerce_numbers_to_str=False)

    uid: str = Field(min_length=1, max_length=256, strict=True)
    instance_id: int | str
    messages: list[Message] = Field(min_length=1)
    reward: float = Field(strict=True)
    extra_info: dict[str, Any] = Field(default_factory=dict)

    @field_validator("instance_id", mode="before")
    @classmethod
    def _instance_id(cls, value: Any) -> int | str:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ValueError(f"must be a string or an integer, got {type(value).__name__}")
        if isinstance(value, str) and not value:
            raise ValueError("must not be empty")
        return value


class TrajectoryBatch(BaseModel):
    """``POST /v1/trajectories``: items stored all-or-nothing, each idempotent by its uid."""

    model_config = ConfigDict(extra="forbid")

    items: list[Trajectory] = Field(min_length=1, max_length=10_000)
    run_id: str | None = None
    # Items that complete a group; unset means the run's group size.
    group_size: int | None = Field(default=None, ge=1, le=100_000)


class ItemResult(BaseModel):
    uid: str
    instance_id: int | str
    status: Literal["stored", "duplicate"]


class WriteResponse(BaseModel):
    run_id: str
    stored: int
    duplicates: int
    results: list[ItemResult]
    # Groups that this write completed.
    sealed_groups: int


class LeaseRequest(BaseModel):
    """``POST /v1/groups/lease``: take complete groups; ack them after use or they return after the lease."""

    model_config = ConfigDict(extra="forbid")

    run_id: str | None = None
    max_groups: int = Field(default=1, ge=1, le=10_000)
    min_groups: int = Field(default=1, ge=0, le=10_000)
    wait_seconds: float = Field(default=0.0, ge=0.0, le=300.0)
    lease_seconds: float | None = Field(default=None, gt=0.0, le=86_400.0)
    queue: Literal["train", "eval"] = QUEUE_TRAIN
    kinds: list[Literal["sample", "trajectory"]] = Field(default_factory=lambda: list(KINDS), min_length=1)


class GroupOut(BaseModel):
    group_id: str
    lease_id: str
    instance_id: str
    kind: str
    queue: str
    partial: bool
    redeliveries: int
    sealed_at_ms: int
    # Sample dicts (kind "sample") or trajectory items (kind "trajectory").
    items: list[dict[str, Any]]


class LeaseResponse(BaseModel):
    run_id: str
    groups: list[GroupOut]


class AckRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    run_id: str | None = None
    lease_ids: list[str] = Field(min_length=1, max_length=100_000)


class AckResponse(BaseModel):
    run_id: str
    acked: int
    # Lease ids that were not current: already acked, or expired and handed to someone else.
    stale: list[str]


class StatsResponse(BaseModel):
    run_id: str
    groups_complete: int
    groups_incomplete: int
    groups_ready: dict[str, int]
    groups_leased: int
    items_held: int
    bytes_held: int
    max_items: int
    max_bytes: int
    oldest_ready_age_s: float | None
    longest_open_idle_s: float | None
    group_size: int
    task_type: str | None
    tasks_pending: int
    tasks_queued: int
    totals: dict[str, int]


def _located(errors: list[Any]) -> list[dict[str, Any]]:
    return [{**error, "loc": ("body", *error.get("loc", ()))} for error in errors]


def parse_json(raw: bytes) -> Any:
    """Decode a request body; malformed JSON is a 422 naming ``body``, like FastAPI's own parsing."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        metrics.child(metrics.REJECTED, "malformed_json").inc()
        raise RequestValidationError(
            [
                {
                    "type": "json_invalid",
                    "loc": ("body", exc.pos),
                    "msg": "JSON decode error",
                    "ctx": {"error": str(exc)},
                }
            ]
        ) from None


def validate(model: type[Model], data: Any) -> Model:
    """``model.model_validate(data)`` with errors as FastAPI's 422 (the field named in the message)."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        metrics.child(metrics.REJECTED, "invalid_field").inc()
        raise RequestValidationError(_located(exc.errors(include_url=False, include_context=False))) from None
