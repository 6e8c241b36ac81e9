"""Reward post-processing before advantages: group normalisation of scalar rewards (slime's ``_post_process_rewards``).

For ``grpo``, ``gspo`` and ``reinforce_plus_plus_baseline`` (unless ``--disable-rewards-normalization``), the rewards
of the ``n = --n-samples-per-prompt`` samples of one prompt form a group ``G`` and

    r̃_i = r_i − mean_G(r)                         (all three estimators)
    r̃_i = (r_i − mean_G(r)) / (std_G(r) + 1e-6)     (grpo/gspo, unless --disable-grpo-std-normalization)

with the unbiased standard deviation. A group of one sample has no spread, so it is only centred. Other estimators
(``reinforce_plus_plus``, ``ppo``) use the raw rewards.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

GROUP_NORMALIZED_ESTIMATORS = ("grpo", "gspo", "reinforce_plus_plus_baseline")
STD_NORMALIZED_ESTIMATORS = ("grpo", "gspo")


def normalize_group_rewards(
    raw_rewards: Sequence[float],
    *,
    n_samples_per_prompt: int,
    advantage_estimator: str,
    rewards_normalization: bool = True,
    grpo_std_normalization: bool = True,
) -> list[float]:
    """Return the rewards the advantage estimator uses, in the order of ``raw_rewards``.

    ``raw_rewards`` holds whole groups back to back (a prompt's samples are adjacent). When the count is not a
    multiple of the group size (a partial batch), all samples form one group, as slime does.
    """
    if n_samples_per_prompt < 1:
        raise ValueError(f"--n-samples-per-prompt must be >= 1, got {n_samples_per_prompt}")
    if advantage_estimator not in GROUP_NORMALIZED_ESTIMATORS or not rewards_normalization:
        return [float(r) for r in raw_rewards]
    if not raw_rewards:
        return []
    rewards = torch.tensor([float(r) for r in raw_rewards], dtype=torch.float64)
    group = n_samples_per_prompt if rewards.numel() % n_samples_per_prompt == 0 else rewards.numel()
    rewards = rewards.view(-1, group)
    rewards = rewards - rewards.mean(dim=-1, keepdim=True)
    if advantage_estimator in STD_NORMALIZED_ESTIMATORS and grpo_std_normalization and group > 1:
        rewards = rewards / (rewards.std(dim=-1, keepdim=True) + 1e-6)
    return rewards.flatten().tolist()
