"""Batched next-token sampling with per-request seeds, and the log-probs the trainer recomputes.

Randomness is a pure function of (request seed, output position, token id): a counter-based hash turned into
Gumbel noise, so a request's tokens depend on its own seed only, not on which other requests share the batch.
Returned log-probs are ``log_softmax(logits / temperature)`` of the full vocabulary (``log_softmax(logits)`` for
greedy rows), before top-k / top-p / min-p / min_new_tokens restrict the sampling support, which is what
SGLang returns by default and what slime's trainer computes (it divides logits by the rollout temperature).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_MASK_24 = (1 << 24) - 1
# splitmix64 constants, as signed 64-bit integers (torch has no uint64 arithmetic).
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)
_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX2 = 0x94D049BB133111EB - (1 << 64)
_STEP = 0xD1B54A32D192ED03 - (1 << 64)


@dataclass
class SamplingRow:
    """The per-request knobs the sampler needs, already validated."""

    temperature: float
    top_p: float
    top_k: int
    min_p: float
    seed: int
    step: int
    banned: tuple[int, ...] = ()


@dataclass
class SampleOutput:
    tokens: list[int]
    logprobs: list[float]
    top_logprobs: list[list[tuple[float, int]]] | None


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 values (torch's ``>>`` is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def uniform_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """Uniform (0, 1) noise ``[rows, vocab]``: splitmix64 of (seed, step, token id), identical on CPU and GPU."""
    token = torch.arange(vocab, device=seeds.device, dtype=torch.int64)
    z = seeds.unsqueeze(1) * _GOLDEN + steps.unsqueeze(1) * _STEP + token.unsqueeze(0)
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    z = z ^ _shr(z, 31)
    return (_shr(z, 40).float() + 0.5) * (1.0 / (1 << 24))


def sample(logits: torch.Tensor, rows: list[SamplingRow], top_logprobs_num: int = 0) -> SampleOutput:
    """Pick one token per row of ``logits [rows, vocab]`` (fp32) and return its log-prob.

    Per-row settings are decided on the host, so the only device-to-host transfer is the result (one sync).
    """
    device = logits.device
    vocab = logits.shape[1]
    all_greedy = all(r.temperature == 0 for r in rows)
    if all_greedy:
        scaled = logits
    else:
        temps = torch.tensor([r.temperature or 1.0 for r in rows], device=device)
        scaled = logits / temps.unsqueeze(1)
    logprobs_all = torch.log_softmax(scaled, dim=-1)

    masked = scaled
    if any(r.banned for r in rows):
        masked = scaled.clone()
        for i, r in enumerate(rows):
            if r.banned:
                masked[i, list(r.banned)] = float("-inf")
    if not all_greedy and any(r.top_k < vocab or r.top_p < 1.0 or r.min_p > 0.0 for r in rows):
        masked = _restrict_support(masked, rows)

    if all_greedy:
        tokens = masked.argmax(dim=-1)
    else:
        seeds = torch.tensor([[r.seed, r.step] for r in rows], device=device, dtype=torch.int64)
        gumbel = -torch.log(-torch.log(uniform_noise(seeds[:, 0], seeds[:, 1], vocab)))
        # Greedy rows get no noise, so one argmax serves both kinds of rows.
        sampled = torch.tensor([r.temperature > 0 for r in rows], device=device).unsqueeze(1)
        tokens = (masked + gumbel * sampled).argmax(dim=-1)
    chosen = logprobs_all.gather(1, tokens.unsqueeze(1)).squeeze(1)
    # Token ids are exact in float64; one transfer carries ids and log-probs.
    host = torch.stack((tokens.double(), chosen.double())).tolist()
    top = None
    if top_logprobs_num > 0:
        values, indices = logprobs_all.topk(min(top_logprobs_num, vocab), dim=-1)
        top = [list(zip(v, i, strict=True)) for v, i in zip(values.tolist(), indices.tolist(), strict=True)]
    return SampleOutput(tokens=[int(t) for t in host[0]], logprobs=host[1], top_logprobs=top)


def _restrict_support(scaled: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Set to -inf every token outside each row's top-k, top-p nucleus and min-p floor."""
    device = scaled.device
    vocab = scaled.shape[1]
    top_k = torch.tensor([min(r.top_k, vocab) for r in rows], device=device)
    top_p = torch.tensor([r.top_p for r in rows], device=device)
    min_p = torch.tensor([r.min_p for r in rows], device=device)
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    rank = torch.arange(vocab, device=device).unsqueeze(0)
    # A token stays if the mass before it is below top_p: the first token always stays.
    drop = (probs.cumsum(dim=-1) - probs) > top_p.unsqueeze(1)
    drop |= rank >= top_k.unsqueeze(1)
    drop |= probs < probs[:, :1] * min_p.unsqueeze(1)
    drop_orig = torch.zeros_like(drop).scatter(1, order, drop)
    return scaled.masked_fill(drop_orig, float("-inf"))
