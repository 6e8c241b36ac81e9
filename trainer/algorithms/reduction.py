"""How per-token loss terms become one number: per-sample means (default) or per-token sums.

Default (slime's ``sum_of_sample_mean``): ``Σ_i Σ_t m_{i,t} x_{i,t} / max(Σ_t m_{i,t}, 1)`` — every sample weighs the same
whatever its length. ``--calculate-per-token-loss``: ``Σ_i Σ_t m_{i,t} x_{i,t}`` — every token weighs the same. The
backend divides the sum by the global sample count (or global masked-token count) of the optimizer step, so the
loss of a step is a mean over the global batch however it is split across ranks and micro-batches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Reducer = Callable[[torch.Tensor], torch.Tensor]


def sum_of_sample_mean(x: torch.Tensor, loss_masks: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ over samples of the masked mean of ``x`` (the samples' tokens concatenated)."""
    total = x.new_zeros(())
    for x_i, m_i in zip(x.split([m.numel() for m in loss_masks]), loss_masks, strict=True):
        m_i = m_i.to(x.dtype)
        total = total + (x_i * m_i).sum() / m_i.sum().clamp_min(1)
    return total


def sum_of_tokens(x: torch.Tensor, loss_masks: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ of ``x`` over every masked token."""
    if not loss_masks:
        return x.new_zeros(())
    return (x * torch.cat(list(loss_masks)).to(x.dtype)).sum()


def make_reducer(loss_masks: Sequence[torch.Tensor], *, per_token: bool) -> Reducer:
    """The reduction a loss function applies to its concatenated per-token terms (passed to custom losses)."""
    masks = list(loss_masks)
    if per_token:
        return lambda x: sum_of_tokens(x, masks)
    return lambda x: sum_of_sample_mean(x, masks)


def normalizer(loss_masks: Sequence[torch.Tensor], *, per_token: bool) -> float:
    """This micro-batch's share of the denominator: its sample count, or its masked-token count."""
    if per_token:
        return float(sum(int(m.sum()) for m in loss_masks))
    return float(len(loss_masks))
