"""The clipped PPO policy loss, its dual-clip variant and GSPO's sequence-level ratio.

Token level (PPO/GRPO): ``ppo_kl_t = log π_old(y_t) − log π_θ(y_t)``, ratio ρ_t = exp(−ppo_kl_t).
Sequence level (GSPO): ``ppo_kl_t = Σ_s m_s (log π_old − log π_θ)(y_s) / max(Σ_s m_s, 1)`` for every token t of the
sample, so ρ is the length-normalised sequence likelihood ratio.

With ε_lo = ``--eps-clip``, ε_hi = ``--eps-clip-high`` and advantage A_t:

    L_t = max(−ρ_t·A_t, −clip(ρ_t, 1−ε_lo, 1+ε_hi)·A_t)
    dual clip (``--eps-clip-c`` = c > 1), for A_t < 0 only:  L_t = min(L_t, −c·A_t)

The dual clip bounds the loss of a very large ratio on a negative advantage (Ye et al., 2020). ``pg_clipfrac``
counts tokens where the clipped term won; ``pg_dualclip_frac`` counts tokens where the dual clip bound won.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def token_ppo_kl(log_probs: torch.Tensor, old_log_probs: torch.Tensor) -> torch.Tensor:
    """``log π_old − log π_θ`` per token."""
    return old_log_probs - log_probs


def gspo_sequence_kl(
    log_probs: Sequence[torch.Tensor],
    old_log_probs: Sequence[torch.Tensor],
    loss_masks: Sequence[torch.Tensor],
) -> torch.Tensor:
    """GSPO: each sample's masked mean of ``log π_old − log π_θ``, broadcast to its tokens and concatenated."""
    parts = []
    for lp, old, mask in zip(log_probs, old_log_probs, loss_masks, strict=True):
        mask = mask.to(lp.dtype)
        seq = ((old - lp) * mask).sum() / mask.sum().clamp_min(1)
        parts.append(seq.expand_as(lp))
    if not parts:
        return torch.zeros(0)
    return torch.cat(parts)


def compute_policy_loss(
    ppo_kl: torch.Tensor,
    advantages: torch.Tensor,
    *,
    eps_clip: float,
    eps_clip_high: float,
    eps_clip_c: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token clipped surrogate loss; returns ``(losses, clipfrac, dualclip_frac)`` (float 0/1 indicators)."""
    ratio = (-ppo_kl).exp()
    unclipped = -ratio * advantages
    clipped = -ratio.clamp(1.0 - eps_clip, 1.0 + eps_clip_high) * advantages
    losses = torch.maximum(unclipped, clipped)
    clipfrac = (clipped > unclipped).float()
    dualclip_frac = torch.zeros_like(clipfrac)
    if eps_clip_c is not None:
        if eps_clip_c <= 1.0:
            raise ValueError(f"--eps-clip-c must be > 1.0 for dual-clip PPO, got {eps_clip_c}")
        bound = -eps_clip_c * advantages
        negative = advantages < 0
        dualclip_frac = (negative & (losses > bound)).float()
        losses = torch.where(negative, torch.minimum(losses, bound), losses)
    return losses, clipfrac, dualclip_frac
