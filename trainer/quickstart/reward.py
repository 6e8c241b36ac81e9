"""The quick start's reward post-processing (``--custom-reward-post-process-path``, slime's signature
``fn(args, samples) -> (raw_rewards, rewards)``): an answer that runs out of tokens scores 0.

The ``math`` grader scores the boxed value alone, so nothing in the reward asks the policy to end its turn after
``\\boxed{N}``; once it stops doing so, every answer is cut at ``--rollout-max-response-len`` while its reward
stays 1, and the drift is free. Scoring truncated answers 0 makes ending the answer part of what is rewarded.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from services.core.sample import Sample
from trainer.backends.batch import normalized_rewards


def truncated_answers_score_zero(args: Any, samples: Sequence[Sample]) -> tuple[list[float], list[float]]:
    """Raw rewards with truncated samples at 0, and their group-normalised values (GRPO's, as without the hook)."""
    raw = [
        0.0 if sample.status is Sample.Status.TRUNCATED else float(sample.get_reward_value(args))
        for sample in samples
    ]
    return raw, normalized_rewards(args, raw)
