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
    """The reduction a loss function applies to its concatenated per-token terms (passed to custom losses).

    A few tensor operations per call whatever the sample count (the per-sample mean sums each sample's masked
    terms with one ``index_add``, then divides each sum by its sample's count, as :func:`sum_of_sample_mean`
    does): a micro-batch of many short responses would otherwise spend its loss in per-sample operations.
    """
    masks = list(loss_masks)
    if not masks:
        return lambda x: x.new_zeros(())
    flat = torch.cat(masks)
    if per_token:
        return lambda x: (_checked(x, flat) * flat.to(x.dtype)).sum()
    sizes = torch.tensor([m.numel() for m in masks], device=flat.device)
    sample_of_token = torch.repeat_interleave(torch.arange(len(masks), device=flat.device), sizes)
    counts = flat.new_zeros(len(masks), dtype=torch.float64).index_add(0, sample_of_token, flat.double())
    counts = counts.clamp_min(1)

    def reduce(x: torch.Tensor) -> torch.Tensor:
        masked = _checked(x, flat) * flat.to(x.dtype)
        sums = masked.new_zeros(len(masks)).index_add(0, sample_of_token, masked)
        return (sums / counts.to(x.dtype)).sum()

    return reduce


def _checked(x: torch.Tensor, flat_mask: torch.Tensor) -> torch.Tensor:
    if x.numel() != flat_mask.numel():
        raise ValueError(f"a loss term of {x.numel()} tokens for loss masks of {flat_mask.numel()} tokens")
    return x


def normalizer(loss_masks: Sequence[torch.Tensor], *, per_token: bool) -> float:
    """This micro-batch's share of the denominator: its sample count, or its masked-token count."""
    if per_token:
        return float(sum(int(m.sum()) for m in loss_masks))
    return float(len(loss_masks))
