"""Checkpoints: save → load → the next step matches an uninterrupted run; reference from a checkpoint; HF export."""

from __future__ import annotations

import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.trainer.helpers import random_batch, trainer_args
from trainer import checkpoint
from trainer.backends.torch_backend import TorchTrainer


class Counter:
    """Stands for the driver's data source: a position that must survive a restart."""

    def __init__(self) -> None:
        self.offset = 0

    def state_dict(self) -> dict[str, int]:
        return {"offset": self.offset}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.offset = state["offset"]


def test_resume_reproduces_the_uninterrupted_run(tiny_model_dir, tmp_path):
    save = tmp_path / "ckpt"
    flags = (
        "--lr",
        "5e-3",
        "--global-batch-size",
        "4",
        "--micro-batch-size",
        "2",
        "--use-kl-loss",
        "--kl-loss-coef",
        "0.05",
    )
    batches = [random_batch(8, seed=s) for s in range(3)]

    with TorchTrainer(trainer_args(tiny_model_dir, *flags, "--save", str(save))) as first:
        data = Counter()
        first.register_state("data_source", data)
        first.train_step(batches[0], rollout_id=0)
        data.offset = 8
        first.save(0)
        after_save = torch.rand(4)
        uninterrupted = [first.train_step(batches[i], rollout_id=i).steps for i in (1, 2)]
        final_params = first.parameter_checksum()

    assert checkpoint.latest_iteration(save) == 0
    resumed_args = trainer_args(tiny_model_dir, *flags, "--load", str(save), "--save", str(save))
    with TorchTrainer(resumed_args) as second:
        data = Counter()
        second.register_state("data_source", data)
        assert second.load() == 0
        assert torch.equal(torch.rand(4), after_save)
        assert data.offset == 8
        resumed = [second.train_step(batches[i], rollout_id=i).steps for i in (1, 2)]
        assert resumed == uninterrupted
        assert second.parameter_checksum() == final_params


def test_reference_model_from_a_checkpoint_step(tiny_model_dir, tmp_path):
    save = tmp_path / "ckpt"
    batch = random_batch(8, seed=1)
    with TorchTrainer(trainer_args(tiny_model_dir, "--lr", "1e-2", "--save", str(save))) as trainer:
        trainer.train_step(batch, rollout_id=0)
        trainer.save(0)
        policy_after_0 = trainer.compute_log_probs(batch)
        trainer.train_step(batch, rollout_id=1)
        trainer.save(1)
    args = trainer_args(
        tiny_model_dir,
        "--use-kl-loss",
        "--kl-loss-coef",
        "0.1",
        "--ref-load",
        str(save),
        "--ref-ckpt-step",
        "0",
    )
    with TorchTrainer(args) as trainer:
        result = trainer.train_step(batch, rollout_id=0)
    expected = sum(
        sum(lp[j] for j, m in enumerate(mask) if m) / max(sum(mask), 1)
        for lp, mask in zip(policy_after_0, batch.loss_masks, strict=True)
    ) / len(batch)
    assert abs(result.rollout["ref_log_probs"] - expected) < 1e-5
    assert result.steps[0]["kl_loss"] != 0.0


def test_hf_export_loads_in_transformers_with_the_trained_weights(tiny_model_dir, tmp_path):
    batch = random_batch(8, seed=2)
    with TorchTrainer(trainer_args(tiny_model_dir, "--lr", "1e-2", "--true-on-policy-mode")) as trainer:
        trainer.train_step(batch, rollout_id=0)
        out = trainer.export_hf(str(tmp_path / "hf"))
        trained = trainer.compute_log_probs(batch)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"]
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert AutoTokenizer.from_pretrained(out).encode("1 + 1")
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        for tokens, response, want in zip(batch.tokens, batch.response_lengths, trained, strict=True):
            logits = model(input_ids=torch.tensor([tokens]), use_cache=False).logits[0]
            logp = torch.log_softmax(logits[len(tokens) - response - 1 : len(tokens) - 1], -1)
            got = logp.gather(-1, torch.tensor(tokens[len(tokens) - response :]).unsqueeze(-1)).squeeze(-1)
            assert got.tolist() == want


def test_sharded_export_writes_an_index(tiny_model_dir, tmp_path):
    state = {"a": torch.zeros(64), "b": torch.ones(64)}
    from transformers import AutoConfig

    out = checkpoint.write_hf_checkpoint(
        tmp_path / "sharded",
        state,
        config=AutoConfig.from_pretrained(tiny_model_dir),
        architecture="Qwen2ForCausalLM",
        tokenizer_source=str(tiny_model_dir),
        max_shard_bytes=300,
    )
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {
        "a": "model-00001-of-00002.safetensors",
        "b": "model-00002-of-00002.safetensors",
    }
