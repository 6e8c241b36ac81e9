"""Custom reward functions loaded by dotted path (--custom-rm-path) in the reward-model tests."""

from __future__ import annotations

from collections import Counter
from typing import Any

from services.core.sample import Sample

calls: list[int] = []


async def exact_match(args: Any, sample: Sample, **kwargs: Any) -> dict[str, Any]:
    """A dict reward: 1.0 for an exact match, the response length, and any keyword the caller passed."""
    score = 1.0 if sample.response.strip() == (sample.label or "") else 0.0
    return {"score": score, "length": len(sample.response), **kwargs}


async def majority_vote(args: Any, samples: list[Sample], **kwargs: Any) -> list[float]:
    """A group reward: the share of the group that gave the same response, so it needs the whole group."""
    calls.append(len(samples))
    counts = Counter(sample.response.strip() for sample in samples)
    return [counts[sample.response.strip()] / len(samples) for sample in samples]


def sync_half(args: Any, sample: Sample, **kwargs: Any) -> float:
    return 0.5


async def explode(args: Any, sample: Sample, **kwargs: Any) -> float:
    if "boom" in sample.response:
        raise RuntimeError("custom reward exploded")
    return 1.0


async def not_a_number(args: Any, sample: Sample, **kwargs: Any) -> str:
    return "high"


async def short_group(args: Any, samples: list[Sample], **kwargs: Any) -> list[float]:
    return [1.0]
