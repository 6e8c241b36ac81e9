"""Policy, dual-clip, GSPO, TIS, value and SFT losses, reductions and log-probs against values computed by hand."""

from __future__ import annotations

import functools
import math
from types import SimpleNamespace

import pytest
import torch

from trainer.algorithms.logprobs import packed_response_log_probs, response_slices, token_log_probs
from trainer.algorithms.loss import LossConfig, PolicyLossInputs, policy_loss, sft_loss, value_loss
from trainer.algorithms.policy_loss import compute_policy_loss, gspo_sequence_kl
from trainer.algorithms.reduction import make_reducer, sum_of_sample_mean, sum_of_tokens
from trainer.algorithms.tis import tis_weights, vanilla_tis

RATIOS = torch.tensor([1.0, 1.5, 0.5, 1.5, 0.5, 3.0])
ADV = torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0, -1.0])


def test_clipped_policy_loss_by_hand():
    losses, clipfrac, dual = compute_policy_loss(-RATIOS.log(), ADV, eps_clip=0.2, eps_clip_high=0.28)
    assert losses.tolist() == pytest.approx([-1.0, -1.28, -0.5, 1.5, 0.8, 3.0], abs=1e-6)
    assert clipfrac.tolist() == [0.0, 1.0, 0.0, 0.0, 1.0, 0.0]
    assert dual.tolist() == [0.0] * 6


def test_dual_clip_bounds_negative_advantages_only():
    losses, clipfrac, dual = compute_policy_loss(
        -RATIOS.log(), ADV, eps_clip=0.2, eps_clip_high=0.28, eps_clip_c=2.0
    )
    assert losses.tolist() == pytest.approx([-1.0, -1.28, -0.5, 1.5, 0.8, 2.0], abs=1e-6)
    assert dual.tolist() == [0.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    # a large ratio on a positive advantage is not touched by the dual clip
    big, _, _ = compute_policy_loss(
        -torch.tensor([10.0]).log(), torch.tensor([1.0]), eps_clip=0.2, eps_clip_high=0.2, eps_clip_c=2.0
    )
    assert big.item() == pytest.approx(-1.2)


def test_dual_clip_constant_must_exceed_one():
    with pytest.raises(ValueError, match="--eps-clip-c"):
        LossConfig(eps_clip_c=0.9)


def test_gspo_uses_the_masked_sequence_mean_log_ratio():
    logp = [torch.tensor([-1.0, -2.0, -3.0]), torch.tensor([-1.0])]
    old = [torch.tensor([-1.5, -2.5, -9.0]), torch.tensor([-0.25])]
    masks = [torch.tensor([1, 1, 0]), torch.tensor([1])]
    kl = gspo_sequence_kl(logp, old, masks)
    assert kl.tolist() == pytest.approx([-0.5, -0.5, -0.5, 0.75])


def _two_samples(**overrides) -> PolicyLossInputs:
    fields = dict(
        log_probs=[torch.tensor([-1.0, -2.0]), torch.tensor([-0.5])],
        entropy=[torch.tensor([0.5, 1.5]), torch.tensor([2.0])],
        old_log_probs=[torch.tensor([-1.0, -2.0]), torch.tensor([-0.5])],
        advantages=[torch.tensor([1.0, 1.0]), torch.tensor([-2.0])],
        loss_masks=[torch.ones(2), torch.ones(1)],
        total_lengths=[4, 3],
        response_lengths=[2, 1],
        ref_log_probs=[torch.tensor([-1.5, -2.0]), torch.tensor([-0.5])],
    )
    fields.update(overrides)
    return PolicyLossInputs(**fields)


def test_policy_loss_with_entropy_bonus_and_kl_loss_per_sample_and_per_token():
    cfg = LossConfig(entropy_coef=0.01, use_kl_loss=True, kl_loss_coef=0.1, kl_loss_type="k1")
    inputs = _two_samples()
    # per sample: pg = mean(-1,-1) + 2 = 1; entropy = 1 + 2 = 3; kl = mean(0.5, 0) + 0 = 0.25
    loss, m = policy_loss(cfg, inputs, make_reducer(inputs.loss_masks, per_token=False))
    assert loss.item() == pytest.approx(1.0 - 0.03 + 0.025)
    assert m["pg_loss"].item() == pytest.approx(1.0)
    assert m["entropy_loss"].item() == pytest.approx(3.0)
    assert m["kl_loss"].item() == pytest.approx(0.25)
    assert m["ppo_kl"].item() == 0.0 and m["pg_clipfrac"].item() == 0.0
    # per token: pg = -1 - 1 + 2 = 0; entropy = 4; kl = 0.5
    loss, m = policy_loss(cfg, inputs, make_reducer(inputs.loss_masks, per_token=True))
    assert loss.item() == pytest.approx(0.0 - 0.04 + 0.05)


def test_policy_loss_gradient_is_minus_advantage_over_length_on_policy():
    logp = [torch.tensor([-1.0, -2.0], requires_grad=True), torch.tensor([-0.5], requires_grad=True)]
    inputs = _two_samples(log_probs=logp)
    loss, _ = policy_loss(LossConfig(), inputs, make_reducer(inputs.loss_masks, per_token=False))
    loss.backward()
    assert logp[0].grad.tolist() == pytest.approx([-0.5, -0.5])
    assert logp[1].grad.tolist() == pytest.approx([2.0])


def test_masked_tokens_do_not_contribute():
    inputs = _two_samples(
        advantages=[torch.tensor([1.0, 100.0]), torch.tensor([-2.0])],
        loss_masks=[torch.tensor([1.0, 0.0]), torch.ones(1)],
    )
    loss, _ = policy_loss(LossConfig(), inputs, make_reducer(inputs.loss_masks, per_token=False))
    assert loss.item() == pytest.approx(-1.0 + 2.0)


def test_use_kl_loss_without_reference_is_an_error():
    inputs = _two_samples(ref_log_probs=None)
    with pytest.raises(ValueError, match="--use-kl-loss"):
        policy_loss(LossConfig(use_kl_loss=True), inputs, make_reducer(inputs.loss_masks, per_token=False))


def test_tis_weights_by_hand():
    weights, metrics = tis_weights(
        torch.tensor([-1.0, -1.0, -1.0]), torch.tensor([-1.5, -0.2, -1.0]), tis_clip=1.5, tis_clip_low=0.5
    )
    assert weights.tolist() == pytest.approx([1.5, 0.5, 1.0])
    assert metrics["tis"].tolist() == pytest.approx([math.exp(0.5), math.exp(-0.8), 1.0], rel=1e-6)
    assert metrics["tis_clipfrac"].tolist() == [1.0, 1.0, 0.0]


def test_policy_loss_applies_tis_weights_and_reports_them():
    args = SimpleNamespace(tis_clip=2.0, tis_clip_low=0.0)
    inputs = _two_samples(
        rollout_log_probs=[torch.tensor([-1.0 - math.log(4.0), -2.0]), torch.tensor([-0.5])]
    )
    reduce = make_reducer(inputs.loss_masks, per_token=False)
    loss, m = policy_loss(
        LossConfig(use_tis=True), inputs, reduce, tis_fn=functools.partial(vanilla_tis, args)
    )
    # weights: token 0 has ratio 4 clipped to 2, the rest 1 → pg = mean(-2, -1) + 2 = 0.5
    assert loss.item() == pytest.approx(0.5)
    assert m["tis"].item() == pytest.approx((4.0 + 1.0) / 2 + 1.0)
    assert m["tis_clipfrac"].item() == pytest.approx(0.5)
    assert m["ois"].item() == pytest.approx(2.0)


def test_tis_without_rollout_log_probs_is_an_error():
    inputs = _two_samples()
    with pytest.raises(ValueError, match="rollout log-probs"):
        policy_loss(
            LossConfig(use_tis=True),
            inputs,
            make_reducer(inputs.loss_masks, per_token=False),
            tis_fn=vanilla_tis,
        )


def test_gspo_policy_loss_clips_the_whole_sequence():
    # sequence log ratio (new − old) = 0.5 → ratio e^0.5 ≈ 1.65 > 1.2, clipped for A > 0
    inputs = _two_samples(
        old_log_probs=[torch.tensor([-1.5, -2.5]), torch.tensor([-0.5])],
    )
    loss, m = policy_loss(
        LossConfig(advantage_estimator="gspo"), inputs, make_reducer(inputs.loss_masks, per_token=False)
    )
    assert loss.item() == pytest.approx(-1.2 + 2.0, abs=1e-6)
    assert m["pg_clipfrac"].item() == pytest.approx(1.0)
    assert m["ppo_kl"].item() == pytest.approx(-0.5)


def test_value_loss_by_hand():
    reduce = make_reducer([torch.ones(3)], per_token=True)
    cfg = LossConfig(value_clip=0.2)
    loss, m = value_loss(
        cfg,
        [torch.tensor([1.0, 2.0, 0.0])],
        [torch.tensor([0.5, 2.1, 0.0])],
        [torch.tensor([1.5, 1.0, 1.0])],
        reduce,
    )
    assert loss.item() == pytest.approx(0.64 + 1.0 + 1.0)
    assert m["value_clipfrac"].item() == pytest.approx(1.0)


def test_sft_loss_is_the_mean_negative_log_likelihood():
    masks = [torch.tensor([1.0, 1.0, 0.0]), torch.ones(1)]
    loss, _ = sft_loss(
        [torch.tensor([-1.0, -3.0, -50.0]), torch.tensor([-0.5])], make_reducer(masks, per_token=False)
    )
    assert loss.item() == pytest.approx(2.0 + 0.5)


def test_reductions_and_empty_mask():
    x = torch.tensor([1.0, 3.0, 5.0, 7.0])
    masks = [torch.tensor([1, 1]), torch.tensor([0, 0])]
    assert sum_of_sample_mean(x, masks).item() == 2.0
    assert sum_of_tokens(x, masks).item() == 4.0


def test_token_log_probs_with_temperature_and_entropy():
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    lp, ent = token_log_probs(logits, torch.tensor([2]), temperature=2.0, with_entropy=True)
    z = [0.5, 1.0, 1.5]
    lse = math.log(sum(math.exp(v) for v in z))
    probs = [math.exp(v - lse) for v in z]
    assert lp.item() == pytest.approx(1.5 - lse, rel=1e-6)
    assert ent.item() == pytest.approx(-sum(p * math.log(p) for p in probs), rel=1e-6)


def test_temperature_must_be_positive():
    with pytest.raises(ValueError, match="--rollout-temperature"):
        token_log_probs(torch.zeros(1, 3), torch.tensor([0]), temperature=0.0)


def test_packed_rows_are_sliced_per_response():
    assert response_slices([3, 4], [1, 2]) == [(1, 2), (4, 6)]
    logits = torch.randn(7, 5)
    tokens = [torch.tensor([0, 1, 2]), torch.tensor([3, 4, 0, 1])]
    lps, _ = packed_response_log_probs(logits, tokens, [3, 4], [1, 2])
    expected_second = torch.log_softmax(logits[4:6], -1)[[0, 1], [0, 1]]
    assert torch.equal(lps[1], expected_second)
    assert lps[0].item() == torch.log_softmax(logits[1], -1)[2].item()


@pytest.mark.parametrize("per_token", [False, True])
def test_reducer_equals_the_per_sample_definition_with_its_gradient(per_token):
    generator = torch.Generator().manual_seed(0)
    lengths = [3, 1, 5, 2, 4]
    masks = [(torch.rand(n, generator=generator) > 0.3).float() for n in lengths]
    masks[1] = torch.zeros(1)  # a fully masked sample counts as one token's worth of nothing
    x = torch.randn(sum(lengths), generator=generator, requires_grad=True)
    reference = sum_of_tokens if per_token else sum_of_sample_mean
    (want_grad,) = torch.autograd.grad(reference(x, masks), x)
    got = make_reducer(masks, per_token=per_token)(x)
    (got_grad,) = torch.autograd.grad(got, x)
    assert got.item() == pytest.approx(reference(x, masks).item(), rel=1e-6)
    torch.testing.assert_close(got_grad, want_grad)
    with pytest.raises(ValueError, match="a loss term of 4 tokens for loss masks of 15 tokens"):
        make_reducer(masks, per_token=per_token)(torch.zeros(4))
