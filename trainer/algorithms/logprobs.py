"""Token log-probabilities and entropy on temperature-scaled logits, computed the way the rollout engine does
(``token_log_probs`` is shared with it: ``services/core/logprobs.py``).

For logits z over the vocabulary and rollout temperature τ (``--rollout-temperature``):
``log π(y) = log_softmax(z / τ)[y]`` and ``H = −Σ_v p_v log p_v`` with ``p = softmax(z / τ)``, both in float32.
In a packed row, the logits at position j predict the token at j + 1, so a sample of total length L whose response
is its last R tokens and which starts at offset o reads logits ``[o + L − R − 1, o + L − 1)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from services.core.logprobs import token_log_probs

__all__ = ["packed_response_log_probs", "response_log_probs", "response_slices", "token_log_probs"]


def response_slices(total_lengths: Sequence[int], response_lengths: Sequence[int]) -> list[tuple[int, int]]:
    """For samples packed back to back, the ``[start, end)`` rows of the logits that predict each response."""
    slices = []
    offset = 0
    for total, response in zip(total_lengths, response_lengths, strict=True):
        if response > total - 1:
            raise ValueError(
                f"response length {response} leaves no prompt token in a sequence of {total} tokens"
            )
        slices.append((offset + total - response - 1, offset + total - 1))
        offset += total
    return slices


def response_log_probs(
    logits: torch.Tensor,
    rows: Sequence[torch.Tensor],
    tokens: Sequence[torch.Tensor],
    response_lengths: Sequence[int],
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """Per-sample response log-probs (and entropies) from the logits ``[T, V]`` of a packed row, where
    ``rows[k]`` are the rows that predict sample k's response tokens (``PackedBatch.response_rows``); one
    log-softmax over all of them (each row is computed on its own, so the values are those of per-sample calls)."""
    targets = [
        sample[len(sample) - response :] for sample, response in zip(tokens, response_lengths, strict=True)
    ]
    for k, (r, t) in enumerate(zip(rows, targets, strict=True)):
        if r.numel() != t.numel():
            raise ValueError(f"sample {k}: {r.numel()} logit rows for a response of {t.numel()} tokens")
    lp, ent = token_log_probs(
        logits[torch.cat(list(rows))], torch.cat(targets), temperature=temperature, with_entropy=with_entropy
    )
    sizes = [int(r.numel()) for r in rows]
    return list(lp.split(sizes)), (list(ent.split(sizes)) if ent is not None else None)


def packed_response_log_probs(
    logits: torch.Tensor,
    tokens: Sequence[torch.Tensor],
    total_lengths: Sequence[int],
    response_lengths: Sequence[int],
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """Per-sample response log-probs (and entropies) from the logits ``[T_packed, V]`` of a packed row."""
    log_probs: list[torch.Tensor] = []
    entropies: list[torch.Tensor] | None = [] if with_entropy else None
    for (start, end), sample_tokens, response in zip(
        response_slices(total_lengths, response_lengths), tokens, response_lengths, strict=True
    ):
        lp, ent = token_log_probs(
            logits[start:end],
            sample_tokens[len(sample_tokens) - response :],
            temperature=temperature,
            with_entropy=with_entropy,
        )
        log_probs.append(lp)
        if entropies is not None:
            entropies.append(ent)
    return log_probs, entropies
