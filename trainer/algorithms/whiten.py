"""Masked whitening of advantages with statistics shared across data-parallel ranks (``--normalize-advantages``).

Over every token with mask 1 on every rank: μ = Σ m·x / Σ m, σ² = (Σ m·x² / Σ m − μ²) · N/(N−1) (Bessel, N = Σ m ≥ 2),
and x̂ = (x − μ) / sqrt(σ² + ε); with ``shift_mean=False`` the mean is added back (x̂ + μ).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def masked_whiten(
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    shift_mean: bool = True,
    epsilon: float = 1e-8,
) -> torch.Tensor:
    """Whiten ``values`` with the masked mean/variance of all ranks in ``group`` (this process alone when
    torch.distributed is not initialised). Raises when no rank has a single unmasked token."""
    if values.shape != mask.shape:
        raise ValueError(
            f"masked_whiten: values shape {tuple(values.shape)} != mask shape {tuple(mask.shape)}"
        )
    values64 = values.double()
    mask64 = mask.double()
    stats = torch.stack([(values64 * mask64).sum(), (values64.square() * mask64).sum(), mask64.sum()])
    if dist.is_available() and dist.is_initialized():
        # NCCL reduces only device tensors; gloo only host ones.
        device = (
            torch.device("cuda", torch.cuda.current_device())
            if dist.get_backend(group) == "nccl"
            else torch.device("cpu")
        )
        stats = stats.to(device)
        dist.all_reduce(stats, group=group)
        stats = stats.cpu()
    total, total_sq, count = stats.tolist()
    if count == 0:
        raise ValueError(
            "--normalize-advantages: no loss-masked token on any data-parallel rank to whiten over"
        )
    mean = total / count
    var = max(total_sq / count - mean * mean, 0.0)
    if count >= 2:
        var *= count / (count - 1)
    whitened = (values64 - mean) * torch.rsqrt(torch.tensor(var + epsilon, dtype=torch.float64))
    if not shift_mean:
        whitened = whitened + mean
    return whitened.to(values.dtype)
