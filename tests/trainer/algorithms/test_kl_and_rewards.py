"""KL estimators and group reward normalisation against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.algorithms.kl import compute_approx_kl
from trainer.algorithms.rewards import normalize_group_rewards

LOGP = torch.tensor([-1.0, -2.0, -0.5])
REF = torch.tensor([-1.5, -1.0, -0.5])  # log ratio = [0.5, -1.0, 0.0]


def test_k1_is_the_log_ratio():
    assert compute_approx_kl(LOGP, REF, "k1").tolist() == pytest.approx([0.5, -1.0, 0.0])


def test_k2_is_half_the_squared_log_ratio():
    assert compute_approx_kl(LOGP, REF, "k2").tolist() == pytest.approx([0.125, 0.5, 0.0])


@pytest.mark.parametrize("kl_type", ["k3", "low_var_kl"])
def test_k3_is_exp_minus_one_minus_log_ratio(kl_type):
    expected = [math.exp(-0.5) - 1 + 0.5, math.exp(1.0) - 1 - 1.0, 0.0]
    assert compute_approx_kl(LOGP, REF, kl_type).tolist() == pytest.approx(expected, rel=1e-6)


def test_low_var_kl_is_clamped_but_k3_is_not():
    logp, ref = torch.tensor([-25.0, -1.0]), torch.tensor([-5.0, -16.0])  # log ratio −20 and +15
    k3 = compute_approx_kl(logp, ref, "k3")
    assert k3[0].item() == pytest.approx(math.exp(20) - 21, rel=1e-5)
    assert k3[1].item() == pytest.approx(math.exp(-15) + 14, rel=1e-6)
    assert compute_approx_kl(logp, ref, "low_var_kl").tolist() == [10.0, 10.0]


def test_kl_of_identical_policies_is_exactly_zero_for_every_estimator():
    logp = torch.randn(64)
    for kl_type in ("k1", "k2", "k3", "low_var_kl"):
        assert torch.equal(compute_approx_kl(logp, logp.clone(), kl_type), torch.zeros(64))


def test_unknown_kl_type_names_the_flag():
    with pytest.raises(ValueError, match="--kl-loss-type"):
        compute_approx_kl(LOGP, REF, "k4")


def test_grpo_rewards_are_centred_and_scaled_per_group():
    out = normalize_group_rewards([1.0, 0.0, 1.0, 1.0], n_samples_per_prompt=2, advantage_estimator="grpo")
    std = math.sqrt(0.5)  # unbiased std of (0.5, -0.5)
    assert out == pytest.approx([0.5 / (std + 1e-6), -0.5 / (std + 1e-6), 0.0, 0.0])


def test_gspo_matches_grpo_and_disable_std_only_centres():
    rewards = [3.0, 1.0, 2.0, 0.0, 0.0, 4.0]
    assert normalize_group_rewards(
        rewards, n_samples_per_prompt=3, advantage_estimator="gspo"
    ) == pytest.approx(normalize_group_rewards(rewards, n_samples_per_prompt=3, advantage_estimator="grpo"))
    centred = normalize_group_rewards(
        rewards, n_samples_per_prompt=3, advantage_estimator="grpo", grpo_std_normalization=False
    )
    assert centred == pytest.approx([1.0, -1.0, 0.0, -4 / 3, -4 / 3, 8 / 3])


def test_reinforce_plus_plus_baseline_is_centred_without_std():
    out = normalize_group_rewards(
        [1.0, 0.0, 0.0, 0.0], n_samples_per_prompt=4, advantage_estimator="reinforce_plus_plus_baseline"
    )
    assert out == pytest.approx([0.75, -0.25, -0.25, -0.25])


@pytest.mark.parametrize("estimator", ["reinforce_plus_plus", "ppo"])
def test_other_estimators_keep_raw_rewards(estimator):
    assert normalize_group_rewards([1.0, 0.0], n_samples_per_prompt=2, advantage_estimator=estimator) == [
        1.0,
        0.0,
    ]


def test_disable_rewards_normalization_keeps_raw_rewards():
    out = normalize_group_rewards(
        [1.0, 0.0], n_samples_per_prompt=2, advantage_estimator="grpo", rewards_normalization=False
    )
    assert out == [1.0, 0.0]


def test_a_partial_batch_is_one_group_and_single_sample_groups_are_only_centred():
    assert normalize_group_rewards(
        [1.0, 2.0, 3.0, 6.0], n_samples_per_prompt=3, advantage_estimator="grpo", grpo_std_normalization=False
    ) == pytest.approx([-2.0, -1.0, 0.0, 3.0])
    assert normalize_group_rewards([5.0, 1.0], n_samples_per_prompt=1, advantage_estimator="grpo") == [
        0.0,
        0.0,
    ]
