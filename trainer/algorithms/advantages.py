"""Advantage estimators (``--advantage-estimator``) and returns, per sample over its response tokens.

Notation: sample i has scalar reward r_i (already group-normalised where the estimator asks for it, see
``rewards.py``), response tokens t = 0..T_i−1, loss mask m_t, per-token KL estimate kl_t (``kl.py``, with
``--kl-loss-type``; zero when ``--kl-coef`` is 0) and KL coefficient β = ``--kl-coef``.

- ``grpo`` / ``gspo``: A_t = G_t = r_i for every token. (β does not shape GRPO/GSPO advantages, as in slime;
  use ``--use-kl-loss`` for a KL penalty there.)
- ``reinforce_plus_plus``: token rewards ρ_t = −β·m_t·kl_t, plus r_i at the last token with m_t = 1; discounted
  returns G_t = ρ_t + γ·G_{t+1}; A_t = G_t.
- ``reinforce_plus_plus_baseline``: A_t = G_t = r_i − β·kl_t (r_i is the group-mean-centred reward).
- ``ppo``: token rewards ρ_t = −β·kl_t, plus r_i at the last response token; with critic values V_t,
  δ_t = ρ_t + γ·V_{t+1} − V_t (V_T = 0), A_t = δ_t + γλ·A_{t+1} (GAE, ``--gamma``, ``--lambd``), G_t = A_t + V_t.

``--normalize-advantages`` then whitens A over every loss-masked token of the rollout, across data-parallel ranks
(``whiten.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from trainer.algorithms.kl import compute_approx_kl
from trainer.algorithms.whiten import masked_whiten

ESTIMATORS = ("grpo", "gspo", "reinforce_plus_plus", "reinforce_plus_plus_baseline", "ppo")


def grpo_returns(rewards: Sequence[float], response_lengths: Sequence[int]) -> list[torch.Tensor]:
    """G_t = r_i broadcast over the T_i response tokens of each sample."""
    return [
        torch.full((length,), float(r), dtype=torch.float32)
        for r, length in zip(rewards, response_lengths, strict=True)
    ]


def discounted_returns(token_rewards: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_t = ρ_t + γ·G_{t+1} with G_T = 0, for a 1-D tensor of token rewards."""
    returns = torch.empty_like(token_rewards)
    running = token_rewards.new_zeros(())
    for t in range(token_rewards.numel() - 1, -1, -1):
        running = token_rewards[t] + gamma * running
        returns[t] = running
    return returns


def reinforce_plus_plus_returns(
    rewards: Sequence[float],
    kl: Sequence[torch.Tensor],
    loss_masks: Sequence[torch.Tensor],
    *,
    kl_coef: float,
    gamma: float,
) -> list[torch.Tensor]:
    """REINFORCE++ returns: ρ_t = −β·m_t·kl_t, r_i added at the last loss-masked token, then discounted."""
    out = []
    for i, (reward, kl_i, mask_i) in enumerate(zip(rewards, kl, loss_masks, strict=True)):
        mask = mask_i.to(torch.float32)
        nonzero = mask.nonzero(as_tuple=True)[0]
        if nonzero.numel() == 0:
            raise ValueError(
                f"reinforce_plus_plus: sample {i} has an all-zero loss mask, so it has no token to reward"
            )
        token_rewards = -kl_coef * (kl_i.float() * mask)
        token_rewards[nonzero[-1]] += float(reward)
        out.append(discounted_returns(token_rewards, gamma))
    return out


def reinforce_plus_plus_baseline_advantages(
    rewards: Sequence[float], kl: Sequence[torch.Tensor], *, kl_coef: float
) -> list[torch.Tensor]:
    """REINFORCE++-baseline: A_t = r_i − β·kl_t, with r_i already centred on its group mean."""
    return [
        torch.full_like(k, float(r), dtype=torch.float32) - kl_coef * k.float()
        for r, k in zip(rewards, kl, strict=True)
    ]


def gae(
    token_rewards: torch.Tensor, values: torch.Tensor, *, gamma: float, lambd: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over one response; returns (advantages, returns = advantages + values)."""
    if token_rewards.shape != values.shape:
        raise ValueError(
            f"gae: rewards shape {tuple(token_rewards.shape)} != values shape {tuple(values.shape)}"
        )
    values = values.float()
    advantages = torch.empty_like(values)
    last = values.new_zeros(())
    length = values.numel()
    for t in range(length - 1, -1, -1):
        next_value = values[t + 1] if t < length - 1 else 0.0
        delta = token_rewards[t] + gamma * next_value - values[t]
        last = delta + gamma * lambd * last
        advantages[t] = last
    return advantages, advantages + values


def ppo_token_rewards(reward: float, kl: torch.Tensor, *, kl_coef: float) -> torch.Tensor:
    """PPO per-token rewards: ρ_t = −β·kl_t, and the scalar reward added at the last response token."""
    token_rewards = -kl_coef * kl.float()
    if token_rewards.numel():
        token_rewards[-1] += float(reward)
    return token_rewards


@dataclass(frozen=True)
class AdvantageConfig:
    """The flags that decide how advantages and returns are computed."""

    estimator: str = "grpo"
    kl_coef: float = 0.0
    kl_type: str = "k1"
    gamma: float = 1.0
    lambd: float = 1.0
    normalize_advantages: bool = False

    def __post_init__(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise ValueError(
                f"--advantage-estimator: unknown estimator {self.estimator!r}; valid: {', '.join(ESTIMATORS)}"
            )

    @classmethod
    def from_args(cls, args) -> AdvantageConfig:
        return cls(
            estimator=args.advantage_estimator,
            kl_coef=args.kl_coef,
            kl_type=args.kl_loss_type,
            gamma=args.gamma,
            lambd=args.lambd,
            normalize_advantages=args.normalize_advantages,
        )


def compute_advantages_and_returns(
    config: AdvantageConfig,
    *,
    rewards: Sequence[float],
    response_lengths: Sequence[int],
    loss_masks: Sequence[torch.Tensor],
    log_probs: Sequence[torch.Tensor] | None = None,
    ref_log_probs: Sequence[torch.Tensor] | None = None,
    values: Sequence[torch.Tensor] | None = None,
    group: dist.ProcessGroup | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Advantages and returns (lists of per-sample 1-D float32 tensors) for this rank's samples.

    ``log_probs``/``ref_log_probs`` are needed only when ``kl_coef != 0``; ``values`` only for ``ppo``. With
    ``normalize_advantages`` the whitening statistics are all-reduced over ``group`` (when torch.distributed is
    initialised), so every data-parallel rank whitens with the same global mean and variance.
    """
    if config.kl_coef != 0:
        if log_probs is None or ref_log_probs is None:
            raise ValueError("--kl-coef is non-zero, so log_probs and ref_log_probs are required")
        kl = [
            compute_approx_kl(lp, rlp, config.kl_type)
            for lp, rlp in zip(log_probs, ref_log_probs, strict=True)
        ]
    else:
        kl = [torch.zeros(length, dtype=torch.float32) for length in response_lengths]

    if config.estimator in ("grpo", "gspo"):
        returns = grpo_returns(rewards, response_lengths)
        advantages = [r.clone() for r in returns]
    elif config.estimator == "reinforce_plus_plus":
        returns = reinforce_plus_plus_returns(
            rewards, kl, loss_masks, kl_coef=config.kl_coef, gamma=config.gamma
        )
        advantages = [r.clone() for r in returns]
    elif config.estimator == "reinforce_plus_plus_baseline":
        advantages = reinforce_plus_plus_baseline_advantages(rewards, kl, kl_coef=config.kl_coef)
        returns = [a.clone() for a in advantages]
    else:
        if values is None:
            raise ValueError("--advantage-estimator ppo needs critic values")
        advantages, returns = [], []
        for reward, kl_i, value_i in zip(rewards, kl, values, strict=True):
            adv, ret = gae(
                ppo_token_rewards(reward, kl_i, kl_coef=config.kl_coef),
                value_i,
                gamma=config.gamma,
                lambd=config.lambd,
            )
            advantages.append(adv)
            returns.append(ret)

    if config.normalize_advantages:
        # Every rank takes part in the all-reduce, even one that holds no samples this rollout.
        flat = torch.cat(advantages) if advantages else torch.zeros(0)
        masks = torch.cat([m.float() for m in loss_masks]) if loss_masks else torch.zeros(0)
        whitened = masked_whiten(flat, masks, group=group, shift_mean=True)
        advantages = list(whitened.split([a.numel() for a in advantages]))
    return advantages, returns
