"""Plugin functions loaded by dotted path in the backend tests (``--custom-loss-function-path`` and
``--custom-tis-function-path``), written against the signatures slime calls."""

from __future__ import annotations

import torch

from trainer.algorithms.logprobs import packed_response_log_probs


def nll_loss(args, batch, logits, sum_of_sample_mean):
    """An SFT loss written as a custom loss: −Σ sample-mean log π of the response tokens."""
    log_probs, _ = packed_response_log_probs(
        logits[0],
        batch["tokens"],
        batch["total_lengths"],
        batch["response_lengths"],
        temperature=args.rollout_temperature,
    )
    loss = -sum_of_sample_mean(torch.cat(log_probs))
    return loss, {"custom_nll": loss.detach()}


def half_weights(
    args, *, train_log_probs, rollout_log_probs, loss_masks, total_lengths, response_lengths, **kwargs
):
    """Every token's policy-loss term weighted by one half."""
    weights = torch.full_like(torch.cat(list(train_log_probs)), 0.5)
    return weights, {"custom_tis": weights}
