from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Sample(_message.Message):
    __slots__ = ("uid", "group_index", "index", "prompt", "tokens", "response", "response_length", "label", "reward", "loss_mask", "weight_versions", "rollout_log_probs", "status", "metadata", "train_metadata", "has_label", "has_reward", "has_loss_mask", "has_rollout_log_probs")
    UID_FIELD_NUMBER: _ClassVar[int]
    GROUP_INDEX_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    REWARD_FIELD_NUMBER: _ClassVar[int]
    LOSS_MASK_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    ROLLOUT_LOG_PROBS_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    TRAIN_METADATA_FIELD_NUMBER: _ClassVar[int]
    HAS_LABEL_FIELD_NUMBER: _ClassVar[int]
    HAS_REWARD_FIELD_NUMBER: _ClassVar[int]
    HAS_LOSS_MASK_FIELD_NUMBER: _ClassVar[int]
    HAS_ROLLOUT_LOG_PROBS_FIELD_NUMBER: _ClassVar[int]
    uid: str
    group_index: int
    index: int
    prompt: _struct_pb2.Value
    tokens: _containers.RepeatedScalarFieldContainer[int]
    response: str
    response_length: int
    label: str
    reward: _struct_pb2.Value
    loss_mask: _containers.RepeatedScalarFieldContainer[int]
    weight_versions: _containers.RepeatedScalarFieldContainer[str]
    rollout_log_probs: _containers.RepeatedScalarFieldContainer[float]
    status: str
    metadata: _struct_pb2.Struct
    train_metadata: _struct_pb2.Struct
    has_label: bool
    has_reward: bool
    has_loss_mask: bool
    has_rollout_log_probs: bool
    def __init__(self, uid: _Optional[str] = ..., group_index: _Optional[int] = ..., index: _Optional[int] = ..., prompt: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ..., tokens: _Optional[_Iterable[int]] = ..., response: _Optional[str] = ..., response_length: _Optional[int] = ..., label: _Optional[str] = ..., reward: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ..., loss_mask: _Optional[_Iterable[int]] = ..., weight_versions: _Optional[_Iterable[str]] = ..., rollout_log_probs: _Optional[_Iterable[float]] = ..., status: _Optional[str] = ..., metadata: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., train_metadata: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., has_label: _Optional[bool] = ..., has_reward: _Optional[bool] = ..., has_loss_mask: _Optional[bool] = ..., has_rollout_log_probs: _Optional[bool] = ...) -> None: ...

class RewardItem(_message.Message):
    __slots__ = ("uid", "prompt", "response", "label", "metadata")
    UID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    uid: str
    prompt: str
    response: str
    label: str
    metadata: _struct_pb2.Struct
    def __init__(self, uid: _Optional[str] = ..., prompt: _Optional[str] = ..., response: _Optional[str] = ..., label: _Optional[str] = ..., metadata: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("items", "rm_type", "reward_key")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    RM_TYPE_FIELD_NUMBER: _ClassVar[int]
    REWARD_KEY_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[RewardItem]
    rm_type: str
    reward_key: str
    def __init__(self, items: _Optional[_Iterable[_Union[RewardItem, _Mapping]]] = ..., rm_type: _Optional[str] = ..., reward_key: _Optional[str] = ...) -> None: ...

class RewardValue(_message.Message):
    __slots__ = ("value", "fields", "is_dict", "error")
    VALUE_FIELD_NUMBER: _ClassVar[int]
    FIELDS_FIELD_NUMBER: _ClassVar[int]
    IS_DICT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    value: float
    fields: _struct_pb2.Struct
    is_dict: bool
    error: str
    def __init__(self, value: _Optional[float] = ..., fields: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., is_dict: _Optional[bool] = ..., error: _Optional[str] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("rewards",)
    REWARDS_FIELD_NUMBER: _ClassVar[int]
    rewards: _containers.RepeatedCompositeFieldContainer[RewardValue]
    def __init__(self, rewards: _Optional[_Iterable[_Union[RewardValue, _Mapping]]] = ...) -> None: ...

class FetchRequest(_message.Message):
    __slots__ = ("run_id", "max_groups", "min_groups", "lease_seconds", "wait_seconds")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_GROUPS_FIELD_NUMBER: _ClassVar[int]
    MIN_GROUPS_FIELD_NUMBER: _ClassVar[int]
    LEASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    max_groups: int
    min_groups: int
    lease_seconds: float
    wait_seconds: float
    def __init__(self, run_id: _Optional[str] = ..., max_groups: _Optional[int] = ..., min_groups: _Optional[int] = ..., lease_seconds: _Optional[float] = ..., wait_seconds: _Optional[float] = ...) -> None: ...

class Group(_message.Message):
    __slots__ = ("group_id", "lease_id", "samples")
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    group_id: str
    lease_id: str
    samples: _containers.RepeatedCompositeFieldContainer[Sample]
    def __init__(self, group_id: _Optional[str] = ..., lease_id: _Optional[str] = ..., samples: _Optional[_Iterable[_Union[Sample, _Mapping]]] = ...) -> None: ...

class AckRequest(_message.Message):
    __slots__ = ("run_id", "lease_ids")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_IDS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    lease_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, run_id: _Optional[str] = ..., lease_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class AckResponse(_message.Message):
    __slots__ = ("acked",)
    ACKED_FIELD_NUMBER: _ClassVar[int]
    acked: int
    def __init__(self, acked: _Optional[int] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class TrainerStatus(_message.Message):
    __slots__ = ("run_id", "rollout_id", "weight_version", "state", "reward_mean")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROLLOUT_ID_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REWARD_MEAN_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    rollout_id: int
    weight_version: int
    state: str
    reward_mean: float
    def __init__(self, run_id: _Optional[str] = ..., rollout_id: _Optional[int] = ..., weight_version: _Optional[int] = ..., state: _Optional[str] = ..., reward_mean: _Optional[float] = ...) -> None: ...
