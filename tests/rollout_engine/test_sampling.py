"""The sampler: seeded noise that depends on the request only, support restriction, and returned log-probs."""

from __future__ import annotations

import torch

from services.rollout_engine.sampling import SamplingRow, sample, uniform_noise


def _row(**kw) -> SamplingRow:
    base = dict(temperature=1.0, top_p=1.0, top_k=1000, min_p=0.0, seed=1, step=0)
    return SamplingRow(**{**base, **kw})


def test_noise_is_uniform_and_a_function_of_seed_step_and_token() -> None:
    noise = uniform_noise(torch.tensor([1, 1, 2]), torch.tensor([0, 1, 0]), 50_000)
    assert noise.min() > 0 and noise.max() < 1
    assert abs(noise.mean().item() - 0.5) < 0.01
    assert not torch.equal(noise[0], noise[1]) and not torch.equal(noise[0], noise[2])
    again = uniform_noise(torch.tensor([2]), torch.tensor([0]), 50_000)
    assert torch.equal(again[0], noise[2])


def test_a_rows_token_does_not_depend_on_its_batch() -> None:
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(0))
    rows = [_row(seed=s, step=3) for s in (5, 6, 7, 8)]
    together = sample(logits, rows).tokens
    alone = [sample(logits[i : i + 1], [rows[i]]).tokens[0] for i in range(4)]
    assert together == alone


def test_sampling_frequencies_follow_the_tempered_distribution() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    temperature = 0.8
    n = 4000
    tokens = sample(
        logits.expand(n, 4), [_row(temperature=temperature, seed=seed) for seed in range(n)]
    ).tokens
    counts = torch.bincount(torch.tensor(tokens), minlength=4).float()
    expected = torch.softmax(logits[0] / temperature, dim=0)
    assert torch.allclose(counts / counts.sum(), expected, atol=0.03)


def test_top_k_top_p_min_p_and_bans_restrict_support_but_not_logprobs() -> None:
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    logprobs = torch.log_softmax(logits[0], dim=0)
    for seed in range(200):
        out = sample(logits, [_row(top_k=2, seed=seed)])
        assert out.tokens[0] in (0, 1)
        assert abs(out.logprobs[0] - logprobs[out.tokens[0]].item()) < 1e-6
        assert sample(logits, [_row(top_p=0.5, seed=seed)]).tokens[0] == 0
        assert sample(logits, [_row(min_p=0.3, seed=seed)]).tokens[0] in (0, 1)
        assert sample(logits, [_row(banned=(0, 1), seed=seed)]).tokens[0] not in (0, 1)
    greedy = sample(logits, [_row(temperature=0.0)], top_logprobs_num=2)
    assert greedy.tokens == [0]
    assert [t for _, t in greedy.top_logprobs[0]] == [0, 1]
