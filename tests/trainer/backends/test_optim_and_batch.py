"""The learning-rate schedule and the conversion of samples into a rollout batch."""

from __future__ import annotations

import math

import pytest
import torch

from services.core.sample import Sample
from tests.trainer.helpers import trainer_args
from trainer.backends.batch import RolloutBatch
from trainer.backends.torch_backend.optim import LRSchedule, OptimizerConfig, build_optimizer


def test_warmup_then_linear_and_cosine_decay():
    linear = OptimizerConfig(lr=1.0, min_lr=0.1, warmup_steps=2, decay_steps=6, decay_style="linear")
    assert [linear.lr_at(s) for s in range(8)] == pytest.approx([0.5, 1.0, 1.0, 0.775, 0.55, 0.325, 0.1, 0.1])
    cosine = OptimizerConfig(lr=1.0, min_lr=0.0, decay_steps=4, decay_style="cosine")
    assert cosine.lr_at(2) == pytest.approx(0.5)
    assert cosine.lr_at(1) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert OptimizerConfig(lr=0.3, decay_style="constant", decay_steps=2).lr_at(5) == 0.3


def test_schedule_drives_the_optimizer_and_round_trips():
    params = [torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(2))]
    config = OptimizerConfig(lr=1.0, warmup_steps=4, decay_steps=8, weight_decay=0.1)
    optimizer = build_optimizer(params, config)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    schedule = LRSchedule(optimizer, config)
    schedule.step()
    assert optimizer.param_groups[0]["lr"] == 0.5
    again = LRSchedule(optimizer, config)
    again.load_state_dict(schedule.state_dict())
    assert again.lr == 0.5


def test_unsupported_decay_style_names_the_flag():
    with pytest.raises(ValueError, match="--lr-decay-style"):
        OptimizerConfig(lr=1.0, decay_style="WSD")


def test_critic_uses_its_own_lr_and_warmup(tiny_model_dir):
    args = trainer_args(
        tiny_model_dir, "--critic-lr", "0.5", "--critic-lr-warmup-iters", "3", "--lr-warmup-iters", "1"
    )
    critic = OptimizerConfig.from_args(args, role="critic", total_steps=10)
    actor = OptimizerConfig.from_args(args, role="actor", total_steps=10)
    assert (critic.lr, critic.warmup_steps) == (0.5, 3)
    assert (actor.lr, actor.warmup_steps) == (args.lr, 1)


def _sample(index: int, reward, *, response_length=2, status=Sample.Status.COMPLETED, **kw) -> Sample:
    return Sample(
        index=index,
        tokens=[1, 2, 3] + list(range(response_length)),
        response_length=response_length,
        reward=reward,
        status=status,
        **kw,
    )


def test_from_samples_normalises_groups_and_fills_defaults(tiny_model_dir):
    args = trainer_args(tiny_model_dir, "--reward-key", "score", rollout_batch_size=2, n_samples=2)
    samples = [
        _sample(0, {"score": 1.0}),
        _sample(1, {"score": 0.0}, status=Sample.Status.TRUNCATED),
        _sample(2, {"score": 2.0}, loss_mask=[0, 1], rollout_log_probs=[-0.1, -0.2]),
        _sample(3, {"score": 2.0}, metadata={"raw_reward": 5.0}),
    ]
    batch = RolloutBatch.from_samples(args, samples)
    assert batch.raw_reward == [1.0, 0.0, 2.0, 5.0]
    assert batch.rewards[2:] == [0.0, 0.0]
    assert batch.rewards[0] == pytest.approx(-batch.rewards[1]) and batch.rewards[0] > 0.7
    assert batch.truncated == [0, 1, 0, 0]
    assert batch.loss_masks[0] == [1, 1] and batch.loss_masks[2] == [0, 1]
    assert batch.rollout_log_probs is None  # only one sample carries engine log-probs
    assert batch.sample_indices == [0, 1, 2, 3]


def test_batch_validation_names_the_field():
    with pytest.raises(ValueError, match="loss_mask has 1 entries"):
        RolloutBatch(tokens=[[1, 2, 3]], response_lengths=[2], rewards=[0.0], loss_masks=[[1]])
    with pytest.raises(ValueError, match="response_length 3"):
        RolloutBatch(tokens=[[1, 2, 3]], response_lengths=[3], rewards=[0.0], loss_masks=[[1, 1, 1]])
    with pytest.raises(ValueError, match="'rewards' has 2 entries"):
        RolloutBatch(tokens=[[1, 2, 3]], response_lengths=[1], rewards=[0.0, 1.0], loss_masks=[[1]])


def test_unscored_samples_are_rejected(tiny_model_dir):
    args = trainer_args(tiny_model_dir, rollout_batch_size=1, n_samples=2)
    with pytest.raises(ValueError, match="sample 1 has no reward"):
        RolloutBatch.from_samples(args, [_sample(0, 1.0), _sample(1, None)])
