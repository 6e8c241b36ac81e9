"""Truncated importance sampling (``--use-tis``) between the trainer's policy and the engine's sampling policy.

The engine samples with π_rollout (its own kernels, maybe fp8), the trainer's old policy is π_old. Each token's
policy-loss term is multiplied by ``w_t = clamp(exp(log π_old(y_t) − log π_rollout(y_t)), C_low, C)`` with
C = ``--tis-clip`` and C_low = ``--tis-clip-low``. Metrics: ``tis`` (the unclamped ratio) and ``tis_clipfrac``.
``--custom-tis-function-path`` replaces the weight function; it is called as
``fn(args, *, train_log_probs, rollout_log_probs, loss_masks, total_lengths, response_lengths)`` with per-sample
lists and returns ``(weights: Tensor of all tokens concatenated, metrics: dict[str, Tensor of all tokens])``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

TisFunction = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]


def vanilla_tis(
    args: Any,
    *,
    train_log_probs: Sequence[torch.Tensor],
    rollout_log_probs: Sequence[torch.Tensor],
    **_: Any,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Token-level truncated IS weights clamp(π_old / π_rollout, tis_clip_low, tis_clip)."""
    return tis_weights(
        torch.cat(list(train_log_probs)),
        torch.cat(list(rollout_log_probs)),
        tis_clip=args.tis_clip,
        tis_clip_low=args.tis_clip_low,
    )


def tis_weights(
    old_log_probs: torch.Tensor, rollout_log_probs: torch.Tensor, *, tis_clip: float, tis_clip_low: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The pure formula behind ``vanilla_tis`` on concatenated token tensors."""
    if old_log_probs.shape != rollout_log_probs.shape:
        raise ValueError(
            f"TIS: trainer log-probs shape {tuple(old_log_probs.shape)} != rollout log-probs shape "
            f"{tuple(rollout_log_probs.shape)}"
        )
    ratio = (old_log_probs.float() - rollout_log_probs.float()).exp()
    weights = ratio.clamp(min=tis_clip_low, max=tis_clip)
    return weights, {"tis": ratio.detach(), "tis_clipfrac": (weights != ratio).float()}


def load_tis_function(path: str | None) -> TisFunction:
    """``--custom-tis-function-path`` when set, else the vanilla token-level TIS."""
    if path is None:
        return vanilla_tis
    from services.core.plugins import load_function

    return load_function(path, flag="--custom-tis-function-path")
