"""Two gloo ranks with FSDP2 against one rank: same update for the same global batch; checkpoints reshard."""

from __future__ import annotations

import pytest

from tests.trainer.helpers import random_batch, trainer_args
from trainer.backends.torch_backend import TorchTrainer

FLAGS = (
    "--global-batch-size",
    "8",
    "--micro-batch-size",
    "2",
    "--lr",
    "1e-2",
    "--use-kl-loss",
    "--kl-loss-coef",
    "0.1",
    "--normalize-advantages",
    "--balance-data",
)


def test_two_ranks_match_one_rank_and_checkpoints_reshard(tiny_model_dir, tmp_path):
    batch = random_batch(8, seed=4)
    with TorchTrainer(trainer_args(tiny_model_dir, *FLAGS)) as single:
        one = single.train_step(batch, rollout_id=0)
        one_params = single.parameter_checksum()

    save = tmp_path / "ckpt"
    two_args = trainer_args(tiny_model_dir, *FLAGS, "--save", str(save))
    two_args.actor_num_gpus_per_node = 2
    with TorchTrainer(two_args) as double:
        two = double.train_step(batch, rollout_id=0)
        two_params = double.parameter_checksum()
        double.save(0)
        exported = double.export_hf(str(tmp_path / "hf"))

    assert two.steps[0]["ppo_kl"] == 0.0 and two.steps[0]["kl_loss"] == 0.0
    for key in ("loss", "pg_loss", "entropy_loss", "grad_norm"):
        assert two.steps[0][key] == pytest.approx(one.steps[0][key], rel=1e-5, abs=1e-6), key
    assert two.rollout["advantages"] == pytest.approx(one.rollout["advantages"], abs=1e-6)
    assert two_params == pytest.approx(one_params, rel=1e-6)

    # The two-rank checkpoint resumes on one rank, and the export holds the same weights.
    with TorchTrainer(trainer_args(tiny_model_dir, *FLAGS, "--load", str(save))) as resumed:
        assert resumed.load() == 0
        assert resumed.parameter_checksum() == pytest.approx(two_params, rel=1e-12)
    with TorchTrainer(trainer_args(exported, *FLAGS)) as from_export:
        assert from_export.parameter_checksum() == pytest.approx(two_params, rel=1e-12)
