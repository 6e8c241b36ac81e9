"""What the HTTP front hands the scheduler (one ``EngineRequest`` per prompt) and what it gets back
(``Snapshot`` events), with SGLang's sampling defaults resolved and checked against the model."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from services.core.wire import SamplingParams

# SGLang treats temperatures below this as greedy decoding.
GREEDY_EPS = 1e-6


class RequestError(ValueError):
    """A request the engine cannot serve; ``field`` names the offending input."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class GenerationParams:
    """SGLang sampling parameters after defaults: ``top_k`` is a real count, greedy is ``temperature == 0``."""

    max_new_tokens: int | None
    min_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    stop: tuple[str, ...]
    stop_token_ids: frozenset[int]
    ignore_eos: bool
    skip_special_tokens: bool
    spaces_between_special_tokens: bool
    no_stop_trim: bool
    sampling_seed: int | None

    @classmethod
    def from_wire(
        cls, params: SamplingParams, vocab_size: int, prefix: str = "sampling_params"
    ) -> GenerationParams:
        """Resolve ``params``; reject what the built-in engine does not implement, naming the field."""

        def where(name: str) -> str:
            return f"{prefix}.{name}" if prefix else name

        unsupported = {
            "frequency_penalty": 0.0,
            "presence_penalty": 0.0,
            "repetition_penalty": 1.0,
            "n": 1,
            "json_schema": None,
            "regex": None,
            "ebnf": None,
            "structural_tag": None,
            "stop_regex": None,
            "logit_bias": None,
            "custom_params": None,
        }
        for name, neutral in unsupported.items():
            if getattr(params, name) not in (neutral, [], {}):
                raise RequestError(
                    f"{getattr(params, name)!r} is not supported by the built-in engine "
                    f"(only the neutral value {neutral!r}); use the SGLang backend for it",
                    where(name),
                )
        stop_ids = frozenset(params.stop_token_ids or ())
        bad = sorted(t for t in stop_ids if not 0 <= t < vocab_size)
        if bad:
            raise RequestError(
                f"ids outside the vocabulary [0, {vocab_size}): {bad[:5]}", where("stop_token_ids")
            )
        stop = params.stop
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        if any(s == "" for s in stops):
            raise RequestError("must not contain empty strings", where("stop"))
        top_k = vocab_size if params.top_k == -1 else min(params.top_k, vocab_size)
        temperature = 0.0 if params.temperature < GREEDY_EPS else params.temperature
        return cls(
            max_new_tokens=params.max_new_tokens,
            min_new_tokens=params.min_new_tokens,
            temperature=temperature,
            top_p=params.top_p,
            top_k=top_k,
            min_p=params.min_p,
            stop=stops,
            stop_token_ids=stop_ids,
            ignore_eos=params.ignore_eos,
            skip_special_tokens=params.skip_special_tokens,
            spaces_between_special_tokens=params.spaces_between_special_tokens,
            no_stop_trim=params.no_stop_trim,
            sampling_seed=params.sampling_seed,
        )


@dataclass
class Snapshot:
    """A request's state as the scheduler reports it: after every step for streams, once at the end otherwise."""

    rid: str
    prompt_tokens: int
    output_ids: list[int]
    output_logprobs: list[float]
    output_top_logprobs: list[list[tuple[float, int]]] | None
    input_logprobs: list[tuple[float | None, int]] | None
    finish_reason: dict[str, Any] | None
    weight_version: str
    created: float
    finished_at: float | None = None
    cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class EngineRequest:
    """One prompt to generate from; ``on_event`` is called from the scheduler thread with each ``Snapshot``."""

    rid: str
    input_ids: list[int]
    params: GenerationParams
    on_event: Callable[[Snapshot], None]
    return_logprob: bool = False
    top_logprobs_num: int = 0
    logprob_start_len: int = -1
    stream: bool = False
    created: float = field(default_factory=time.time)
