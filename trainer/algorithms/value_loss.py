"""The critic's clipped value loss (PPO).

With new values V_t, the values V_old,t recorded before the update, returns G_t and ε_v = ``--value-clip``:

    V^clip_t = V_old,t + clip(V_t − V_old,t, −ε_v, ε_v)
    L_t      = max((V^clip_t − G_t)², (V_t − G_t)²)

``value_clipfrac`` counts tokens with |V_t − V_old,t| > ε_v.
"""

from __future__ import annotations

import torch


def compute_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, *, value_clip: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token clipped value loss and the clip indicator (float 0/1)."""
    clipped = old_values + (values - old_values).clamp(-value_clip, value_clip)
    losses = torch.maximum((clipped - returns).square(), (values - returns).square())
    clipfrac = ((values - old_values).abs() > value_clip).float()
    return losses, clipfrac
