"""Per-token KL estimators between the current policy and a reference (Schulman, "Approximating KL divergence").

With ``log_ratio = log π(y_t) − log π_ref(y_t)`` and tokens sampled from π:

- ``k1``: ``log_ratio`` — unbiased, high variance, can be negative;
- ``k2``: ``log_ratio² / 2`` — biased, low variance, non-negative;
- ``k3``: ``exp(−log_ratio) − 1 + log_ratio`` — unbiased for KL(π‖π_ref), non-negative;
- ``low_var_kl``: ``k3`` clamped to ``[−10, 10]`` for numerical safety.
"""

from __future__ import annotations

import torch

KL_TYPES = ("k1", "k2", "k3", "low_var_kl")


def compute_approx_kl(log_probs: torch.Tensor, ref_log_probs: torch.Tensor, kl_type: str) -> torch.Tensor:
    """Element-wise KL estimate (same shape as the inputs, float32) for ``--kl-loss-type`` ``kl_type``."""
    log_ratio = log_probs.float() - ref_log_probs.float()
    if kl_type == "k1":
        return log_ratio
    if kl_type == "k2":
        return log_ratio.square() / 2.0
    if kl_type in ("k3", "low_var_kl"):
        neg = -log_ratio
        kl = neg.exp() - 1.0 - neg
        if kl_type == "low_var_kl":
            kl = kl.clamp(min=-10.0, max=10.0)
        return kl
    raise ValueError(f"--kl-loss-type: unknown KL estimator {kl_type!r}; valid: {', '.join(KL_TYPES)}")
