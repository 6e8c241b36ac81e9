"""What rollout functions return, with slime's names, and the call that accepts slime's legacy return shapes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from services.core.sample import Sample


@dataclass
class RolloutFnTrainOutput:
    samples: list[list[Sample]]
    metrics: dict[str, Any] | None = None


@dataclass
class RolloutFnEvalOutput:
    """``data`` maps a dataset name to ``{"rewards": [...], "truncated": [...], "samples": [...]}``."""

    data: dict[str, dict[str, Any]]
    metrics: dict[str, Any] | None = field(default=None)


def call_rollout_fn(
    fn: Callable[..., Any], args: Any, rollout_id: int, data_source: Any, *, evaluation: bool
) -> RolloutFnTrainOutput | RolloutFnEvalOutput:
    """Call a ``--rollout-function-path``/``--eval-function-path`` function as slime does (data source third,
    positionally) and wrap a legacy list/dict return value."""
    output = fn(args, rollout_id, data_source, evaluation=evaluation)
    if evaluation:
        if isinstance(output, RolloutFnEvalOutput):
            return output
        if isinstance(output, dict):
            return RolloutFnEvalOutput(data=output)
        raise TypeError(
            f"the eval function returned {type(output).__name__}; expected RolloutFnEvalOutput or dict"
        )
    if isinstance(output, RolloutFnTrainOutput):
        return output
    if isinstance(output, list):
        return RolloutFnTrainOutput(samples=output)
    raise TypeError(
        f"the rollout function returned {type(output).__name__}; expected RolloutFnTrainOutput or list[list[Sample]]"
    )
