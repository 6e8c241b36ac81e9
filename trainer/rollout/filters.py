"""slime's built-in filters: the dynamic-sampling filter on reward spread and the default buffer filter."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from services.core.sample import Sample


@dataclass
class DynamicFilterOutput:
    """What a ``--dynamic-sampling-filter-path`` function returns (a bare bool is accepted too)."""

    keep: bool
    reason: str | None = None


def check_reward_nonzero_std(args: Any, samples: list[Sample], **kwargs: Any) -> DynamicFilterOutput:
    """Keep a group only if its rewards differ: a group with one reward value carries no GRPO signal."""
    rewards = [s.get_reward_value(args) for s in samples]
    keep = len(rewards) > 1 and max(rewards) - min(rewards) > 0
    return DynamicFilterOutput(keep=keep, reason=None if keep else f"zero_std_{round(float(rewards[0]), 1)}")


def pop_first(
    args: Any, rollout_id: int | None, buffer: list[list[Sample]], num_samples: int
) -> list[list[Sample]]:
    """slime's default buffer filter: take the oldest ``num_samples`` groups out of the buffer."""
    taken = buffer[:num_samples]
    del buffer[:num_samples]
    return taken
