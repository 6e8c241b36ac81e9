"""The torch backend on CPU with one in-process rank: on-policy first step, log-probs, learning, PPO, options."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.trainer.helpers import grouped_batch, random_batch, trainer_args
from trainer.backends.torch_backend import TorchTrainer


def hf_log_probs(model_dir, batch, temperature: float) -> list[torch.Tensor]:
    """Each sample alone through a plain transformers model: log_softmax(logits / T) of its response tokens."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for tokens, response in zip(batch.tokens, batch.response_lengths, strict=True):
            ids = torch.tensor([tokens])
            logits = model(
                input_ids=ids, position_ids=torch.arange(len(tokens)).unsqueeze(0), use_cache=False
            ).logits[0]
            logp = torch.log_softmax(
                logits[len(tokens) - response - 1 : len(tokens) - 1].float() / temperature, -1
            )
            out.append(logp.gather(-1, ids[0, len(tokens) - response :].unsqueeze(-1)).squeeze(-1))
    return out


def test_first_step_is_exactly_on_policy(tiny_model_dir):
    args = trainer_args(
        tiny_model_dir,
        "--use-kl-loss",
        "--kl-loss-coef",
        "0.1",
        "--kl-loss-type",
        "low_var_kl",
        "--use-tis",
        "--micro-batch-size",
        "2",
        "--global-batch-size",
        "4",
        "--lr",
        "1e-3",
    )
    with TorchTrainer(args) as trainer:
        batch = random_batch(8)
        batch.rollout_log_probs = trainer.compute_log_probs(batch)
        result = trainer.train_step(batch, rollout_id=0)
        first = result.steps[0]
        assert first["ppo_kl"] == 0.0
        assert first["pg_clipfrac"] == 0.0
        assert first["kl_loss"] == 0.0
        assert first["tis"] == 1.0 and first["tis_clipfrac"] == 0.0
        assert result.rollout["kl"] == 0.0
        assert result.rollout["train_rollout_logprob_abs_diff"] == 0.0
        # the second step of the rollout has moved off-policy, and the policy away from the reference
        assert result.steps[1]["ppo_kl"] != 0.0
        second = trainer.train_step(batch, rollout_id=1)
        assert second.steps[0]["ppo_kl"] == 0.0
        assert second.steps[0]["kl_loss"] > 0.0


@pytest.mark.skipif(
    torch.cuda.is_available(),
    reason="compares the trainer on CPU with a CPU transformers forward bit for bit (on GPU the trainer takes the GPU)",
)
def test_packed_log_probs_match_single_sequences_and_true_on_policy_is_bitwise(tiny_model_dir):
    batch = random_batch(8, seed=3)
    expected = hf_log_probs(tiny_model_dir, batch, temperature=0.7)
    packed_args = trainer_args(tiny_model_dir, "--micro-batch-size", "4", "--rollout-temperature", "0.7")
    with TorchTrainer(packed_args) as trainer:
        packed = trainer.compute_log_probs(batch)
    for got, want in zip(packed, expected, strict=True):
        assert torch.allclose(torch.tensor(got), want, atol=1e-5)
    exact_args = trainer_args(
        tiny_model_dir, "--true-on-policy-mode", "--micro-batch-size", "4", "--rollout-temperature", "0.7"
    )
    with TorchTrainer(exact_args) as trainer:
        exact = trainer.compute_log_probs(batch)
    for got, want in zip(exact, expected, strict=True):
        assert got == want.tolist()


def test_shared_prompts_train_as_whole_samples_do(tiny_model_dir):
    """A GRPO rollout (4 prompts × 4 responses) trained with each group's prompt stored once, against the same
    rollout packed sample by sample (--disable-prompt-sharing): the same log-probs, losses and update, up to float
    rounding."""
    batch = grouped_batch(4, 4, seed=9)
    flags = (
        "--micro-batch-size", "8", "--global-batch-size", "8", "--use-kl-loss", "--kl-loss-coef", "0.1",
        "--advantage-estimator", "grpo", "--lr", "1e-3", "--rollout-temperature", "0.8",
    )  # fmt: skip
    results, token_counts = [], []
    for extra in ((), ("--disable-prompt-sharing",)):
        args = trainer_args(tiny_model_dir, *flags, *extra, rollout_batch_size=4, n_samples=4)
        with TorchTrainer(args) as trainer:
            worker, packed_tokens = trainer.actor._local, []
            forward = worker._forward

            def counting_forward(
                local, positions, worker=worker, forward=forward, packed_tokens=packed_tokens
            ):
                packed_tokens.append(worker._pack(local, positions).num_tokens)
                return forward(local, positions)

            worker._forward = counting_forward
            log_probs = trainer.compute_log_probs(batch)
            batch.rollout_log_probs = log_probs
            steps = [trainer.train_step(batch, rollout_id=i).steps for i in range(2)]
            results.append((log_probs, steps, trainer.parameter_checksum()))
            token_counts.append(packed_tokens)
    # Each prompt is packed once per micro-batch instead of once per sample.
    prompt_tokens = sum(t - r for t, r in zip(batch.total_lengths, batch.response_lengths, strict=True))
    assert sum(token_counts[1][:2]) == sum(batch.total_lengths)
    assert sum(token_counts[0][:2]) == sum(batch.total_lengths) - prompt_tokens * 3 // 4
    (shared_lps, shared_steps, shared_params), (plain_lps, plain_steps, plain_params) = results
    for got, want in zip(shared_lps, plain_lps, strict=True):
        assert got == pytest.approx(want, abs=1e-5)
    for got, want in zip(shared_steps, plain_steps, strict=True):
        assert len(got) == len(want) == 2
        for g, w in zip(got, want, strict=True):
            assert g.keys() == w.keys()
            for key in ("loss", "pg_loss", "kl_loss", "ppo_kl", "grad_norm"):
                assert g[key] == pytest.approx(w[key], rel=1e-4, abs=1e-6), key
    assert shared_params == pytest.approx(plain_params, rel=1e-6)


def test_sft_loss_goes_down(tiny_model_dir):
    args = trainer_args(
        tiny_model_dir,
        "--loss-type",
        "sft_loss",
        "--disable-compute-advantages-and-returns",
        "--lr",
        "1e-2",
        "--lr-decay-style",
        "constant",
        "--micro-batch-size",
        "4",
    )
    batch = random_batch(8, seed=5)
    with TorchTrainer(args) as trainer:
        losses = [trainer.train_step(batch, rollout_id=i).steps[0]["loss"] for i in range(4)]
    assert losses[-1] < losses[0] - 0.5
    assert all(math.isfinite(v) for v in losses)


def test_ppo_trains_a_critic_and_the_actor_after_critic_only_steps(tiny_model_dir):
    args = trainer_args(
        tiny_model_dir,
        "--advantage-estimator",
        "ppo",
        "--num-critic-only-steps",
        "1",
        "--critic-lr",
        "1e-2",
        "--lambd",
        "0.95",
        "--gamma",
        "0.99",
        "--kl-coef",
        "0.01",
        "--normalize-advantages",
    )
    batch = random_batch(8, seed=7)
    with TorchTrainer(args) as trainer:
        assert trainer.critic is not None
        first = trainer.train_step(batch, rollout_id=0)
        assert first.steps == [] and first.critic_steps
        second = trainer.train_step(batch, rollout_id=1)
        assert second.steps and second.critic_steps
        assert second.critic_steps[0]["value_loss"] < first.critic_steps[0]["value_loss"]
        assert abs(second.rollout["advantages"]) < 1.0
        assert "values" in second.rollout


def test_dynamic_batch_size_and_per_token_loss_run(tiny_model_dir):
    args = trainer_args(
        tiny_model_dir,
        "--use-dynamic-batch-size",
        "--max-tokens-per-gpu",
        "16",
        "--calculate-per-token-loss",
        "--eps-clip-c",
        "3.0",
        "--entropy-coef",
        "0.01",
    )
    with TorchTrainer(args) as trainer:
        result = trainer.train_step(random_batch(8, seed=11), rollout_id=0)
    assert result.steps[0]["ppo_kl"] == 0.0
    assert result.steps[0]["pg_dualclip_frac"] == 0.0
    assert math.isfinite(result.steps[0]["grad_norm"])


def test_a_rollout_must_fill_whole_global_batches(tiny_model_dir):
    args = trainer_args(tiny_model_dir, "--global-batch-size", "4")
    with TorchTrainer(args) as trainer, pytest.raises(ValueError, match="--global-batch-size 4"):
        trainer.train_step(random_batch(6), rollout_id=0)


def test_custom_loss_is_called_with_slimes_signature(tiny_model_dir):
    batch = random_batch(8, seed=9)
    flags = (
        "--disable-compute-advantages-and-returns",
        "--micro-batch-size",
        "4",
        "--global-batch-size",
        "4",
    )
    with TorchTrainer(trainer_args(tiny_model_dir, "--loss-type", "sft_loss", *flags)) as trainer:
        sft = trainer.train_step(batch, rollout_id=0).steps
    custom_flags = (
        "--loss-type",
        "custom_loss",
        "--custom-loss-function-path",
        "tests.trainer.backends.plugins.nll_loss",
    )
    with TorchTrainer(trainer_args(tiny_model_dir, *custom_flags, *flags)) as trainer:
        custom = trainer.train_step(batch, rollout_id=0).steps
    assert [s["custom_nll"] for s in custom] == pytest.approx([s["loss"] for s in sft], rel=1e-6)
    assert custom[1]["grad_norm"] == pytest.approx(sft[1]["grad_norm"], rel=1e-5)


def test_custom_tis_function_weights_the_policy_loss(tiny_model_dir):
    batch = random_batch(8, seed=10)
    flags = ("--global-batch-size", "8", "--micro-batch-size", "8")
    with TorchTrainer(trainer_args(tiny_model_dir, *flags)) as trainer:
        batch.rollout_log_probs = trainer.compute_log_probs(batch)
        plain = trainer.train_step(batch, rollout_id=0).steps[0]
    tis = ("--use-tis", "--custom-tis-function-path", "tests.trainer.backends.plugins.half_weights")
    with TorchTrainer(trainer_args(tiny_model_dir, *flags, *tis)) as trainer:
        halved = trainer.train_step(batch, rollout_id=0).steps[0]
    assert halved["pg_loss"] == pytest.approx(plain["pg_loss"] / 2, rel=1e-6)
    assert halved["custom_tis"] == pytest.approx(0.5)


def test_keep_old_actor_computes_the_ratio_against_the_generating_policy(tiny_model_dir):
    batch = random_batch(8, seed=12)
    flags = ("--lr", "1e-2", "--global-batch-size", "8")
    with TorchTrainer(trainer_args(tiny_model_dir, *flags, "--keep-old-actor")) as trainer:
        first = trainer.train_step(batch, rollout_id=0)
        second = trainer.train_step(batch, rollout_id=1)
    # No push happened, so the behaviour policy is still the initial one.
    assert second.rollout["log_probs"] == first.rollout["log_probs"]
    assert second.steps[0]["ppo_kl"] != 0.0


def test_ref_update_interval_moves_the_reference_to_the_actor(tiny_model_dir):
    batch = random_batch(8, seed=13)
    flags = ("--lr", "1e-2", "--global-batch-size", "8", "--use-kl-loss", "--kl-loss-coef", "0.1")
    with TorchTrainer(trainer_args(tiny_model_dir, *flags, "--ref-update-interval", "1")) as trainer:
        trainer.train_step(batch, rollout_id=0)
        assert trainer.train_step(batch, rollout_id=1).steps[0]["kl_loss"] == 0.0
    with TorchTrainer(trainer_args(tiny_model_dir, *flags)) as trainer:
        trainer.train_step(batch, rollout_id=0)
        assert trainer.train_step(batch, rollout_id=1).steps[0]["kl_loss"] > 0.0


def _train_counting_forwards(args, batch, rollout_id: int = 0):
    """One ``train_step`` on a fresh trainer: its result, the model forwards it ran and the parameter checksum."""
    with TorchTrainer(args) as trainer:
        batch.rollout_log_probs = trainer.compute_log_probs(batch)
        forwards = []
        hook = trainer.actor._local.model.register_forward_hook(lambda *_: forwards.append(1))
        result = trainer.train_step(batch, rollout_id=rollout_id)
        hook.remove()
        return result, len(forwards), trainer.parameter_checksum()


ONE_STEP_FLAGS = (
    "--micro-batch-size", "2", "--global-batch-size", "8", "--lr", "1e-2",
    "--use-kl-loss", "--kl-loss-coef", "0.1", "--kl-loss-type", "low_var_kl",
    "--use-tis", "--use-rollout-entropy",
)  # fmt: skip


def test_a_one_step_rollout_reads_the_old_policy_off_the_training_forward(tiny_model_dir):
    batch = random_batch(8, seed=14)
    reused, reused_forwards, reused_params = _train_counting_forwards(
        trainer_args(tiny_model_dir, *ONE_STEP_FLAGS), batch
    )
    # --keep-old-actor runs the old policy's pass on its stored copy, which at the first rollout is the current
    # weights: the same computation as before the shortcut existed.
    recomputed, recomputed_forwards, recomputed_params = _train_counting_forwards(
        trainer_args(tiny_model_dir, *ONE_STEP_FLAGS, "--keep-old-actor"), batch
    )
    # Four micro-batches each: the reference pass and training, plus the old policy's pass when it runs.
    assert (reused_forwards, recomputed_forwards) == (8, 12)
    assert reused.steps == recomputed.steps
    assert reused.rollout == recomputed.rollout
    assert reused_params == recomputed_params
    assert reused.steps[0]["ppo_kl"] == 0.0 and reused.steps[0]["tis"] == 1.0
    assert {"log_probs", "entropy", "kl", "train_rollout_logprob_abs_diff"} <= set(reused.rollout)


@pytest.mark.parametrize(
    ("flags", "passes"),
    [
        pytest.param(("--global-batch-size", "4"), 2, id="two-steps-per-rollout"),
        pytest.param(("--keep-old-actor",), 2, id="keep-old-actor"),
        pytest.param(
            (
                "--advantage-estimator",
                "reinforce_plus_plus_baseline",
                "--normalize-advantages",
                "--kl-coef",
                "0.1",
            ),
            3,
            id="kl-coef-shapes-advantages",
        ),
    ],
)
def test_the_old_policy_pass_runs_when_the_training_forward_cannot_stand_in(tiny_model_dir, flags, passes):
    args = trainer_args(tiny_model_dir, "--micro-batch-size", "2", "--global-batch-size", "8", *flags)
    _, forwards, _ = _train_counting_forwards(args, random_batch(8, seed=15))
    # The old policy's pass, training and (with --kl-coef) the reference pass, four micro-batches each.
    assert forwards == 4 * passes


def test_rollout_metrics_are_means_of_each_samples_masked_mean(tiny_model_dir):
    """rollout/* keys: the mean over samples of each sample's mean over its unmasked response tokens."""
    batch = random_batch(8, seed=5, response=(1, 6))
    expected_log_probs = hf_log_probs(tiny_model_dir, batch, temperature=1.0)
    # The engine's log-probs, made to differ from the trainer's by a known amount per token.
    batch.rollout_log_probs = [
        (lp + 0.01 * torch.arange(1, len(lp) + 1)).tolist() for lp in expected_log_probs
    ]
    masks = [torch.tensor(m, dtype=torch.float64) for m in batch.loss_masks]
    assert any(m.min() == 0 for m in masks)

    def mean_of_masked_means(values: list[torch.Tensor]) -> float:
        return sum(float((v.double() * m).sum() / m.sum()) for v, m in zip(values, masks, strict=True)) / len(
            masks
        )

    args = trainer_args(tiny_model_dir, "--use-tis", "--micro-batch-size", "3", "--global-batch-size", "8")
    with TorchTrainer(args) as trainer:
        result = trainer.train_step(batch, rollout_id=0)
    rollout = [torch.tensor(lp) for lp in batch.rollout_log_probs]
    assert result.rollout["rollout_log_probs"] == pytest.approx(mean_of_masked_means(rollout), abs=1e-9)
    assert result.rollout["log_probs"] == pytest.approx(mean_of_masked_means(expected_log_probs), abs=1e-5)
    diffs = [0.01 * torch.arange(1, len(lp) + 1, dtype=torch.float64) for lp in expected_log_probs]
    assert result.rollout["train_rollout_logprob_abs_diff"] == pytest.approx(
        mean_of_masked_means(diffs), abs=1e-5
    )
