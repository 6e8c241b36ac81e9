"""Advantage estimators, GAE and whitening against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.algorithms.advantages import (
    AdvantageConfig,
    compute_advantages_and_returns,
    discounted_returns,
    gae,
)
from trainer.algorithms.whiten import masked_whiten


def approx(t: torch.Tensor, expected, **kw):
    assert t.tolist() == pytest.approx(expected, **kw)


def test_grpo_broadcasts_the_reward_to_every_token():
    adv, ret = compute_advantages_and_returns(
        AdvantageConfig(estimator="grpo"),
        rewards=[2.0, -1.0],
        response_lengths=[3, 2],
        loss_masks=[torch.ones(3), torch.tensor([1.0, 0.0])],
    )
    approx(adv[0], [2.0, 2.0, 2.0])
    approx(adv[1], [-1.0, -1.0])
    approx(ret[1], [-1.0, -1.0])


def test_grpo_ignores_kl_coef_like_slime():
    logp, ref = [torch.tensor([-1.0, -1.0])], [torch.tensor([-2.0, -2.0])]
    adv, _ = compute_advantages_and_returns(
        AdvantageConfig(estimator="gspo", kl_coef=0.5),
        rewards=[1.0],
        response_lengths=[2],
        loss_masks=[torch.ones(2)],
        log_probs=logp,
        ref_log_probs=ref,
    )
    approx(adv[0], [1.0, 1.0])


def test_discounted_returns():
    approx(discounted_returns(torch.tensor([1.0, 0.0, 2.0]), 0.5), [1.5, 1.0, 2.0])


def test_reinforce_plus_plus_puts_the_reward_on_the_last_masked_token_and_discounts():
    # k1 KL = [0.1, 0.2, 0.3, 0.4]; the last token is masked out.
    ref = torch.tensor([-1.0, -1.0, -1.0, -1.0])
    logp = ref + torch.tensor([0.1, 0.2, 0.3, 0.4])
    adv, ret = compute_advantages_and_returns(
        AdvantageConfig(estimator="reinforce_plus_plus", kl_coef=0.5, kl_type="k1", gamma=0.9),
        rewards=[1.0],
        response_lengths=[4],
        loss_masks=[torch.tensor([1, 1, 1, 0])],
        log_probs=[logp],
        ref_log_probs=[ref],
    )
    # token rewards: [-0.05, -0.1, -0.15 + 1, 0]
    g2 = 0.85
    g1 = -0.1 + 0.9 * g2
    g0 = -0.05 + 0.9 * g1
    approx(ret[0], [g0, g1, g2, 0.0], abs=1e-6)
    assert torch.equal(adv[0], ret[0])


def test_reinforce_plus_plus_rejects_a_fully_masked_sample():
    with pytest.raises(ValueError, match="all-zero loss mask"):
        compute_advantages_and_returns(
            AdvantageConfig(estimator="reinforce_plus_plus"),
            rewards=[1.0],
            response_lengths=[2],
            loss_masks=[torch.zeros(2)],
        )


def test_reinforce_plus_plus_baseline_subtracts_the_shaped_kl():
    ref = torch.tensor([-1.0, -1.0])
    logp = ref + torch.tensor([0.2, -0.4])
    adv, ret = compute_advantages_and_returns(
        AdvantageConfig(estimator="reinforce_plus_plus_baseline", kl_coef=0.1),
        rewards=[0.5],
        response_lengths=[2],
        loss_masks=[torch.ones(2)],
        log_probs=[logp],
        ref_log_probs=[ref],
    )
    approx(adv[0], [0.48, 0.54], abs=1e-6)
    approx(ret[0], [0.48, 0.54], abs=1e-6)


def test_gae_by_hand():
    values = torch.tensor([0.5, 0.6, 0.7])
    adv, ret = gae(torch.tensor([0.0, 0.0, 1.0]), values, gamma=0.9, lambd=0.8)
    a2 = 1.0 - 0.7
    a1 = (0.9 * 0.7 - 0.6) + 0.72 * a2
    a0 = (0.9 * 0.6 - 0.5) + 0.72 * a1
    approx(adv, [a0, a1, a2], abs=1e-6)
    approx(ret, [a0 + 0.5, a1 + 0.6, a2 + 0.7], abs=1e-6)


def test_ppo_shapes_rewards_with_kl_and_adds_the_reward_at_the_end():
    ref = torch.zeros(3)
    logp = torch.full((3,), 0.5)  # k1 KL = 0.5 everywhere
    adv, ret = compute_advantages_and_returns(
        AdvantageConfig(estimator="ppo", kl_coef=0.2, gamma=1.0, lambd=1.0),
        rewards=[1.0],
        response_lengths=[3],
        loss_masks=[torch.ones(3)],
        log_probs=[logp],
        ref_log_probs=[ref],
        values=[torch.zeros(3)],
    )
    # token rewards [-0.1, -0.1, 0.9]; with V = 0 and γ = λ = 1 the advantages are suffix sums.
    approx(adv[0], [0.7, 0.8, 0.9], abs=1e-6)
    approx(ret[0], [0.7, 0.8, 0.9], abs=1e-6)


def test_ppo_needs_values():
    with pytest.raises(ValueError, match="critic values"):
        compute_advantages_and_returns(
            AdvantageConfig(estimator="ppo"), rewards=[1.0], response_lengths=[1], loss_masks=[torch.ones(1)]
        )


def test_normalize_advantages_whitens_over_masked_tokens_only():
    adv, _ = compute_advantages_and_returns(
        AdvantageConfig(estimator="grpo", normalize_advantages=True),
        rewards=[1.0, 2.0, 4.0],
        response_lengths=[1, 2, 1],
        loss_masks=[torch.ones(1), torch.tensor([1.0, 0.0]), torch.ones(1)],
    )
    # masked values 1, 2, 4: mean 7/3, E[x²] = 7, var = 14/9, Bessel (3/2) → 7/3
    mean, std = 7 / 3, math.sqrt(7 / 3 + 1e-8)
    approx(torch.cat(adv), [(1 - mean) / std, (2 - mean) / std, (2 - mean) / std, (4 - mean) / std], abs=1e-6)


def test_whiten_without_shift_keeps_the_mean():
    out = masked_whiten(torch.tensor([1.0, 3.0]), torch.ones(2), shift_mean=False)
    std = math.sqrt(2.0 + 1e-8)
    approx(out, [-1 / std + 2, 1 / std + 2], abs=1e-6)


def test_whiten_with_nothing_masked_in_fails_loudly():
    with pytest.raises(ValueError, match="--normalize-advantages"):
        masked_whiten(torch.ones(2), torch.zeros(2))


def test_unknown_estimator_names_the_flag():
    with pytest.raises(ValueError, match="--advantage-estimator"):
        AdvantageConfig(estimator="a2c")
