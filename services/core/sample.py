"""The rollout ``Sample``: slime's ``slime.utils.types.Sample`` field for field, plus a stable ``uid``, with the
dict round trip slime uses and a protobuf round trip (``slime.v1.Sample``) for gRPC.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from enum import StrEnum
from numbers import Real
from typing import Any

from google.protobuf import struct_pb2

from protos import slime_pb2
from services.core.grpc_util import dict_to_struct, python_to_value, struct_to_dict, value_to_python


def new_uid() -> str:
    """A fresh sample id; stays with the sample through retries so writes keyed by it are idempotent."""
    return uuid.uuid4().hex


@dataclass
class Sample:
    """One prompt/response pair and everything the trainer needs from its generation.

    Fields and defaults are slime's (reference commit 657d8ee56), in slime's order so positional construction
    keeps working; ``uid`` comes last.
    """

    group_index: int | None = None
    index: int | None = None
    # Chat-templated text, or a list of multimodal parts such as {"type": "text", "text": ...}.
    prompt: str | list[dict[str, Any]] = ""
    # Prompt followed by response token ids.
    tokens: list[int] = field(default_factory=list)
    response: str = ""
    # Number of tokens after the first-turn prompt (multi-turn tool output included).
    response_length: int = 0
    label: str | None = None
    reward: float | dict[str, Any] | None = None
    loss_mask: list[int] | None = None
    # The engine's meta_info.weight_version of every generate call that produced this response.
    weight_versions: list[str] = field(default_factory=list)
    rollout_log_probs: list[float] | None = None

    class Status(StrEnum):
        PENDING = "pending"
        COMPLETED = "completed"
        TRUNCATED = "truncated"
        ABORTED = "aborted"

    status: Status = Status.PENDING
    metadata: dict[str, Any] = field(default_factory=dict)
    # Per-sample training options, e.g. which loss applies.
    train_metadata: dict[str, Any] | None = None
    uid: str = field(default_factory=new_uid)

    def __post_init__(self) -> None:
        if not isinstance(self.status, Sample.Status):
            self.status = _parse_status(self.status)

    def to_dict(self) -> dict[str, Any]:
        """A shallow dict of every field, with ``status`` as its string value (slime's format, plus uid)."""
        value = {f.name: getattr(self, f.name) for f in fields(self)}
        value["status"] = self.status.value
        return value

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Sample:
        """The inverse of ``to_dict``; missing fields take their defaults (a missing uid gets a fresh one)."""
        unknown = sorted(set(data) - _FIELD_NAMES)
        if unknown:
            raise ValueError(f"Sample has no field(s) {unknown}; valid fields: {sorted(_FIELD_NAMES)}")
        return cls(**data)

    def to_proto(self) -> slime_pb2.Sample:
        """This sample as a ``slime.v1.Sample`` message; None fields are recorded in the has_* flags."""
        msg = slime_pb2.Sample()
        _assign(msg, "uid", self.uid)
        if self.group_index is not None:
            _assign(msg, "group_index", self.group_index)
        if self.index is not None:
            _assign(msg, "index", self.index)
        if not isinstance(self.prompt, str) and not (
            isinstance(self.prompt, list) and all(isinstance(part, Mapping) for part in self.prompt)
        ):
            raise TypeError(
                f"Sample.prompt must be a str or a list of dicts, got {type(self.prompt).__name__}"
            )
        msg.prompt.CopyFrom(python_to_value(self.prompt, path="Sample.prompt"))
        _assign(msg, "tokens", self.tokens)
        _assign(msg, "response", self.response)
        _assign(msg, "response_length", self.response_length)
        if self.label is not None:
            if not isinstance(self.label, str):
                raise TypeError(
                    f"Sample.label must be a str or None, got {type(self.label).__name__} {self.label!r}; "
                    "convert labels to str when loading the dataset"
                )
            msg.label = self.label
            msg.has_label = True
        if self.reward is not None:
            msg.reward.CopyFrom(_reward_to_value(self.reward))
            msg.has_reward = True
        if self.loss_mask is not None:
            _assign(msg, "loss_mask", self.loss_mask)
            msg.has_loss_mask = True
        _assign(msg, "weight_versions", self.weight_versions)
        if self.rollout_log_probs is not None:
            _assign(msg, "rollout_log_probs", self.rollout_log_probs)
            msg.has_rollout_log_probs = True
        msg.status = self.status.value
        msg.metadata.CopyFrom(dict_to_struct(self.metadata, path="Sample.metadata"))
        if self.train_metadata is not None:
            msg.train_metadata.CopyFrom(dict_to_struct(self.train_metadata, path="Sample.train_metadata"))
        return msg

    @classmethod
    def from_proto(cls, msg: slime_pb2.Sample) -> Sample:
        """The inverse of ``to_proto``. Struct numbers without a fractional part come back as int."""
        return cls(
            group_index=msg.group_index if msg.HasField("group_index") else None,
            index=msg.index if msg.HasField("index") else None,
            prompt=value_to_python(msg.prompt) if msg.HasField("prompt") else "",
            tokens=list(msg.tokens),
            response=msg.response,
            response_length=msg.response_length,
            label=msg.label if msg.has_label else None,
            reward=_reward_from_value(msg.reward) if msg.has_reward else None,
            loss_mask=list(msg.loss_mask) if msg.has_loss_mask else None,
            weight_versions=list(msg.weight_versions),
            rollout_log_probs=list(msg.rollout_log_probs) if msg.has_rollout_log_probs else None,
            status=_parse_status(msg.status) if msg.status else Sample.Status.PENDING,
            metadata=struct_to_dict(msg.metadata),
            train_metadata=struct_to_dict(msg.train_metadata) if msg.HasField("train_metadata") else None,
            uid=msg.uid,
        )

    def get_reward_value(self, args: Any) -> float | None:
        """The scalar reward: ``reward[args.reward_key]`` when --reward-key is set, else ``reward`` (as slime)."""
        key = getattr(args, "reward_key", None)
        if not key:
            return self.reward
        if not isinstance(self.reward, Mapping):
            raise TypeError(
                f"--reward-key {key!r} is set but sample {self.uid} has reward {self.reward!r}, not a dict"
            )
        if key not in self.reward:
            raise KeyError(
                f"--reward-key {key!r} not in the reward of sample {self.uid}; keys: {sorted(self.reward)}"
            )
        return self.reward[key]


_FIELD_NAMES = frozenset(f.name for f in fields(Sample))


def _parse_status(value: Any) -> Sample.Status:
    try:
        return Sample.Status(value)
    except ValueError:
        valid = [status.value for status in Sample.Status]
        raise ValueError(f"Sample.status must be one of {valid}, got {value!r}") from None


def _assign(msg: slime_pb2.Sample, name: str, value: Any) -> None:
    """Set a scalar or extend a repeated field, naming the field when protobuf rejects the value."""
    try:
        if isinstance(value, list | tuple):
            getattr(msg, name).extend(value)
        else:
            setattr(msg, name, value)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"Sample.{name}: {exc}") from exc


def _reward_to_value(reward: Any) -> struct_pb2.Value:
    if isinstance(reward, Mapping):
        return python_to_value(reward, path="Sample.reward")
    if isinstance(reward, Real):
        return python_to_value(float(reward), path="Sample.reward")
    raise TypeError(f"Sample.reward must be a number, a dict or None, got {type(reward).__name__} {reward!r}")


def _reward_from_value(value: struct_pb2.Value) -> float | dict[str, Any]:
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        return value.number_value
    if kind == "struct_value":
        return struct_to_dict(value.struct_value)
    raise ValueError(f"Sample.reward must be a number or a struct on the wire, got {kind or 'nothing'}")
