"""Token log-probabilities on temperature-scaled logits, the one computation the rollout engine (for the log-probs
it returns) and the trainer (for the log-probs it recomputes) share, so that the two agree bit for bit.

For logits z over the vocabulary and temperature τ: ``log π(y) = log_softmax(z / τ)[y]`` and
``H = −Σ_v p_v log p_v`` with ``p = softmax(z / τ)``, both in float32.
"""

from __future__ import annotations

import torch


def token_log_probs(
    logits: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(log_probs [T], entropy [T] | None)`` for logits ``[T, V]`` and target token ids ``[T]``."""
    if temperature <= 0:
        raise ValueError(f"--rollout-temperature must be > 0 to compute log-probs, got {temperature}")
    scaled = logits.float()
    if temperature != 1.0:
        scaled = scaled / temperature
    log_softmax = torch.log_softmax(scaled, dim=-1)
    log_probs = log_softmax.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    entropy = None
    if with_entropy:
        entropy = -(log_softmax.exp() * log_softmax).sum(dim=-1)
    return log_probs, entropy
