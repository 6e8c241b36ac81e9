"""Pydantic v2 models of the HTTP wire: SGLang's ``/generate`` request and response (same field names and checks
as SGLang), slime's remote reward request and the rollout-buffer trajectory item. docs/wire.md describes them.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    TypeAdapter,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

# SGLang's "every token" top_k; -1 on the wire means the same.
TOP_K_ALL = -1


class SamplingParams(BaseModel):
    """SGLang's sampling parameters: every name SGLang's ``/generate`` accepts, with its defaults and checks.

    slime sends temperature, top_p, top_k, max_new_tokens, stop, stop_token_ids, skip_special_tokens,
    no_stop_trim, spaces_between_special_tokens and (deterministic mode) sampling_seed. The rest are accepted
    so a request meant for a real SGLang engine passes through unchanged; ``model_fields_set`` tells an engine
    which ones the caller actually set. A name SGLang does not know is rejected (SGLang fails such a request
    too). As in SGLang, null means "the default", except for max_new_tokens where it means "no limit".
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    max_new_tokens: int | None = Field(default=128, ge=0)
    min_new_tokens: int = Field(default=0, ge=0)
    temperature: float = Field(default=1.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = TOP_K_ALL
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=2.0)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    stop_regex: str | list[str] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    n: int = Field(default=1, ge=1)
    json_schema: str | None = None
    regex: str | None = None
    ebnf: str | None = Field(default=None, validate_default=True)
    structural_tag: str | None = None
    custom_params: dict[str, Any] | None = None
    stream_interval: int | None = Field(default=None, ge=1)
    logit_bias: dict[str, float] | None = None
    sampling_seed: int | None = None

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        # Only for parameters that cannot be None: max_new_tokens=null keeps its SGLang meaning (no limit).
        if not isinstance(data, dict):
            return data
        return {key: value for key, value in data.items() if value is not None or key not in _NOT_NULLABLE}

    @field_validator("min_new_tokens")
    @classmethod
    def _min_within_max(cls, value: int, info: ValidationInfo) -> int:
        max_new_tokens = info.data.get("max_new_tokens")
        if max_new_tokens is not None and value > max_new_tokens:
            raise ValueError(f"must be in [0, max_new_tokens={max_new_tokens}], got {value}")
        return value

    @field_validator("top_k")
    @classmethod
    def _top_k_range(cls, value: int) -> int:
        if value != TOP_K_ALL and value < 1:
            raise ValueError(f"must be -1 (all tokens) or at least 1, got {value}")
        return value

    @field_validator("ebnf")
    @classmethod
    def _one_grammar(cls, value: str | None, info: ValidationInfo) -> str | None:
        grammars = {
            "json_schema": info.data.get("json_schema"),
            "regex": info.data.get("regex"),
            "ebnf": value,
        }
        chosen = [name for name, grammar in grammars.items() if grammar is not None]
        if len(chosen) > 1:
            raise ValueError(f"only one of json_schema, regex or ebnf may be set, got {chosen}")
        return value


_NOT_NULLABLE = frozenset(
    name for name, info in SamplingParams.model_fields.items() if type(None) not in get_args(info.annotation)
)

_SAMPLING_PARAMS = TypeAdapter(SamplingParams)
_SAMPLING_PARAMS_LIST = TypeAdapter(list[SamplingParams])
_TOKENS = TypeAdapter(list[NonNegativeInt])
_TOKEN_BATCH = TypeAdapter(list[list[NonNegativeInt]])


def _batch_size(info: ValidationInfo) -> int | None:
    """The batch size of a GenerateRequest being validated, or None for a single prompt."""
    text, input_ids = info.data.get("text"), info.data.get("input_ids")
    if isinstance(text, list):
        return len(text)
    if input_ids and isinstance(input_ids[0], list):
        return len(input_ids)
    return None


def _check_per_item(name: str, value: Any, info: ValidationInfo) -> None:
    # input_ids is missing from info.data only when the prompt itself failed validation; that error suffices.
    if not isinstance(value, list) or "input_ids" not in info.data:
        return
    size = _batch_size(info)
    if size is None:
        raise ValueError(
            f"a list of {name} needs a batch of prompts (text as a list or input_ids as a list of lists)"
        )
    if len(value) != size:
        raise ValueError(f"has {len(value)} entries for a batch of {size} prompts")


class GenerateRequest(BaseModel):
    """SGLang's ``POST /generate`` body: exactly one of ``text`` / ``input_ids``, single or batched.

    A batch is ``text`` as a list of strings or ``input_ids`` as a list of lists; ``sampling_params``,
    ``return_logprob``, ``rid`` and ``image_data`` are then either one value for all or a list with one entry per
    prompt. Other top-level fields SGLang knows (``logprob_start_len``, ``lora_path``, ...) are kept as extras and
    forwarded untouched; SGLang itself ignores names it does not know.
    """

    model_config = ConfigDict(extra="allow")

    text: str | list[str] | None = None
    input_ids: list[NonNegativeInt] | list[list[NonNegativeInt]] | None = Field(
        default=None, validate_default=True
    )
    sampling_params: SamplingParams | list[SamplingParams] = Field(default_factory=SamplingParams)
    return_logprob: bool | list[bool] = False
    # Adds each token's text as the third element of meta_info.output_token_logprobs entries.
    return_text_in_logprobs: bool = False
    rid: str | list[str] | None = None
    stream: bool = False
    # Base64-encoded images or URLs: one (or a list) per prompt.
    image_data: str | list[str] | list[list[str]] | None = None

    # Single-or-list fields are dispatched on the input's shape so that an error's location is the field path
    # (sampling_params.temperature), not a union branch name.
    @field_validator("input_ids", mode="wrap")
    @classmethod
    def _exactly_one_prompt(
        cls, value: Any, handler: Any, info: ValidationInfo
    ) -> list[int] | list[list[int]] | None:
        if value is not None:
            batch = isinstance(value, list) and bool(value) and isinstance(value[0], list)
            value = (_TOKEN_BATCH if batch else _TOKENS).validate_python(value)
        if "text" not in info.data:
            return value
        if (info.data["text"] is None) == (value is None):
            raise ValueError(
                "exactly one of text or input_ids is required"
                if value is None
                else "give text or input_ids, not both"
            )
        if value is not None and (not value or any(isinstance(row, list) and not row for row in value)):
            raise ValueError("must not be empty")
        return value

    @field_validator("text")
    @classmethod
    def _non_empty_batch(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and not value:
            raise ValueError("a batch must hold at least one prompt")
        return value

    @field_validator("sampling_params", mode="wrap")
    @classmethod
    def _sampling_params_shape(
        cls, value: Any, handler: Any, info: ValidationInfo
    ) -> SamplingParams | list[SamplingParams]:
        if value is None:
            return SamplingParams()
        params = (_SAMPLING_PARAMS_LIST if isinstance(value, list) else _SAMPLING_PARAMS).validate_python(
            value
        )
        _check_per_item("sampling_params", params, info)
        return params

    @field_validator("return_logprob", "rid", "image_data")
    @classmethod
    def _one_per_prompt(cls, value: Any, info: ValidationInfo) -> Any:
        if info.field_name == "image_data" and _batch_size(info) is None:
            # A single prompt may carry several images.
            return value
        _check_per_item(info.field_name or "", value, info)
        return value

    @property
    def is_batch(self) -> bool:
        return isinstance(self.text, list) or bool(self.input_ids and isinstance(self.input_ids[0], list))

    @property
    def batch_size(self) -> int:
        if isinstance(self.text, list):
            return len(self.text)
        if self.input_ids and isinstance(self.input_ids[0], list):
            return len(self.input_ids)
        return 1

    def split(self) -> list[GenerateRequest]:
        """One single-prompt request per batch entry (a single request gives itself).

        A batch-wide ``rid`` string becomes ``{rid}_{i}``, as in SGLang; ``sampling_params.n`` is not expanded.
        """
        if not self.is_batch:
            return [self]
        requests = []
        for i in range(self.batch_size):
            item = self.model_copy(
                update={
                    "text": self.text[i] if isinstance(self.text, list) else None,
                    "input_ids": self.input_ids[i] if self.input_ids is not None else None,
                    "sampling_params": _pick(self.sampling_params, i),
                    "return_logprob": _pick(self.return_logprob, i),
                    "rid": self.rid[i]
                    if isinstance(self.rid, list)
                    else (f"{self.rid}_{i}" if self.rid else None),
                    "image_data": _pick(self.image_data, i),
                }
            )
            requests.append(item)
        return requests


def _pick(value: Any, i: int) -> Any:
    return value[i] if isinstance(value, list) else value


class FinishReason(BaseModel):
    """Why generation stopped: ``stop`` (``matched`` = the stop/EOS token id or stop string that ended it),
    ``length`` (``length`` = tokens generated) or ``abort`` (``message``)."""

    model_config = ConfigDict(extra="allow")

    type: Literal["stop", "length", "abort"]
    matched: int | str | None = None
    length: int | None = None
    message: str | None = None

    @model_serializer(mode="wrap")
    def _omit_unset_details(self, handler: Any) -> dict[str, Any]:
        # SGLang sends only the detail that belongs to the type ({"type": "length", "length": 16}).
        return {key: value for key, value in handler(self).items() if value is not None or key == "type"}


class MetaInfo(BaseModel):
    """``meta_info`` of a generate response. Extra SGLang fields (cached_tokens, ...) are kept."""

    model_config = ConfigDict(extra="allow", coerce_numbers_to_str=True)

    id: str
    # None only in the intermediate chunks of a stream.
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # One [logprob, token_id, token_text] per generated token; the text is null unless return_text_in_logprobs.
    output_token_logprobs: list[tuple[float, int, str | None]] | None = None
    weight_version: str | None = None
    e2e_latency: float | None = None


class GenerateResponse(BaseModel):
    """SGLang's ``/generate`` answer for one prompt (a batch request is answered with a JSON list of these)."""

    model_config = ConfigDict(extra="allow")

    text: str
    output_ids: list[int] = Field(default_factory=list)
    meta_info: MetaInfo


class RewardRequest(BaseModel):
    """What slime's ``remote_rm`` posts to ``--rm-url``: {prompt, response, label}, plus optional metadata.

    Unknown fields are ignored so custom slime reward clients that send more keep working; a numeric label is
    read as its string form.
    """

    model_config = ConfigDict(extra="ignore", coerce_numbers_to_str=True)

    prompt: str | list[dict[str, Any]]
    response: str
    label: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)


class TrajectoryMessage(BaseModel):
    """One chat message of a trajectory; ``step_loss_mask`` 0 excludes an assistant turn from the loss."""

    model_config = ConfigDict(extra="allow")

    role: str = Field(min_length=1)
    content: str | list[dict[str, Any]] | None = None
    step_loss_mask: int | None = Field(default=None, ge=0, le=1)


class TrajectoryItem(BaseModel):
    """One agent trajectory as slime's rollout buffer takes it (``POST /buffer/write``).

    Samples of one prompt share ``instance_id`` (slime groups by it); ``uid`` identifies this trajectory, so a
    repeated write is recognised. Extra top-level keys are kept, as slime's buffer stores items verbatim.
    """

    model_config = ConfigDict(extra="allow", allow_inf_nan=False, coerce_numbers_to_str=True)

    uid: str = Field(min_length=1)
    instance_id: int | str
    messages: list[TrajectoryMessage] = Field(min_length=1)
    reward: float
    extra_info: dict[str, Any] = Field(default_factory=dict)
