"""The Megatron backend on CUDA with megatron-core: the same log-probs, loss and first update as the torch backend
on the same model and batch, Hugging Face weights out bitwise, checkpoint resume, activation recomputation
changing no result, tensor, pipeline, context, expert and data parallelism matching one rank, and ``slime train
--train-backend megatron`` end to end with NCCL weight sync. Skipped without a GPU or without megatron-core; the
parallel and end-to-end cases need two GPUs."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from services.core.tiny_model import build_tiny_model, default_corpus
from tests.engine_servers import engine_process
from tests.trainer.helpers import random_batch, trainer_args
from trainer import checkpoint
from trainer.backends.torch_backend import TorchTrainer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(importlib.util.find_spec("megatron") is None, reason="needs megatron-core"),
]
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
four_gpus = pytest.mark.skipif(torch.cuda.device_count() < 4, reason="needs four GPUs")

ROOT = Path(__file__).resolve().parents[3]
STEP = (
    "--global-batch-size",
    "8",
    "--micro-batch-size",
    "4",
    "--lr",
    "1e-3",
    "--use-kl-loss",
    "--kl-loss-coef",
    "0.1",
)


def report(**values: float) -> None:
    """Measured figures, one line each, for whoever reads the test log."""
    for key, value in values.items():
        print(f"MEGATRON-CHECK {key}={value:.6g}")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(
        tmp_path_factory.mktemp("megatron") / "qwen2",
        arch="qwen2",
        hidden_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=256,
        corpus=default_corpus(lines=200),
    )


def _megatron(model_dir: Path, *flags: str):
    from trainer.backends.megatron_backend.trainer import MegatronTrainer

    return MegatronTrainer(trainer_args(model_dir, *STEP, *flags, "--train-backend", "megatron"))


def _state(trainer, directory: Path) -> dict[str, torch.Tensor]:
    # Through a Hugging Face export: the ranks live in other processes.
    return checkpoint.read_hf_weights(trainer.export_hf(str(directory)), flag="export")


def _run(trainer, batch, directory: Path) -> dict:
    lp0 = trainer.compute_log_probs(batch)
    state0 = _state(trainer, directory / "before")
    step = trainer.train_step(batch, rollout_id=0).steps[0]
    state1 = _state(trainer, directory / "after")
    lp1 = trainer.compute_log_probs(batch)
    return {"lp0": lp0, "lp1": lp1, "step": step, "state0": state0, "state1": state1}


def _flat(lps: list[list[float]]) -> torch.Tensor:
    return torch.tensor([x for lp in lps for x in lp], dtype=torch.float64)


def _delta(run: dict) -> torch.Tensor:
    return torch.cat(
        [(run["state1"][k].double() - run["state0"][k].double()).flatten() for k in sorted(run["state0"])]
    )


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_megatron_matches_the_torch_backend(model_dir, precision, tmp_path):
    flags = ("--bf16",) if precision == "bf16" else ()
    batch = random_batch(8, seed=3, prompt=(4, 12), response=(4, 12))
    with TorchTrainer(trainer_args(model_dir, *STEP, *flags)) as torch_trainer:
        ref = _run(torch_trainer, batch, tmp_path / "torch")
    with _megatron(model_dir, *flags) as mg_trainer:
        got = _run(mg_trainer, batch, tmp_path / "megatron")
    lp_ref, lp_got = _flat(ref["lp0"]), _flat(got["lp0"])
    after_ref, after_got = _flat(ref["lp1"]), _flat(got["lp1"])
    cosine = torch.nn.functional.cosine_similarity(_delta(got), _delta(ref), dim=0).item()
    figures = {
        "logprob_mean_rel": _rel(lp_got.mean().item(), lp_ref.mean().item()),
        "logprob_max_abs": (lp_got - lp_ref).abs().max().item(),
        "loss_rel": _rel(got["step"]["loss"], ref["step"]["loss"]),
        "grad_norm_rel": _rel(got["step"]["grad_norm"], ref["step"]["grad_norm"]),
        "update_cosine": cosine,
        "logprob_after_step_mean_rel": _rel(after_got.mean().item(), after_ref.mean().item()),
    }
    report(**{f"{precision}_{k}": v for k, v in figures.items()})
    assert got["step"]["ppo_kl"] == 0.0 and got["step"]["kl_loss"] == 0.0
    assert figures["logprob_mean_rel"] < 1e-3
    assert figures["loss_rel"] < 1e-3
    assert figures["logprob_after_step_mean_rel"] < 1e-3
    # bf16 parameters round away part of a 1e-3 step, so their measured update is noisier.
    assert cosine > (0.99 if precision == "fp32" else 0.95)
    if precision == "fp32":
        assert figures["logprob_max_abs"] < 1e-4 and figures["grad_norm_rel"] < 1e-3
        # Hugging Face → Megatron → Hugging Face, gathered on the GPU: bitwise.
        original = checkpoint.read_hf_weights(model_dir, flag="--hf-checkpoint")
        assert sorted(got["state0"]) == sorted(original)
        assert all(torch.equal(got["state0"][k], original[k]) for k in original)


def test_checkpoint_resume_continues_the_same_run(model_dir, tmp_path):
    flags = ("--save", str(tmp_path / "ckpt"), "--load", str(tmp_path / "ckpt"))
    first, second = random_batch(8, seed=5), random_batch(8, seed=6)
    with _megatron(model_dir, *flags) as trainer:
        assert trainer.load() is None
        trainer.train_step(first, rollout_id=0)
        trainer.save(0)
        saved = trainer.parameter_checksum()
        continued = trainer.train_step(second, rollout_id=1).steps[0]
        continued_sum = trainer.parameter_checksum()
    with _megatron(model_dir, *flags) as resumed:
        assert resumed.load() == 0
        assert resumed.parameter_checksum() == saved
        again = resumed.train_step(second, rollout_id=1).steps[0]
        assert resumed.parameter_checksum() == pytest.approx(continued_sum, rel=1e-6)
    assert again["loss"] == pytest.approx(continued["loss"], rel=1e-6)
    assert again["lr"] == continued["lr"]
    assert (tmp_path / "ckpt" / "iter_0000000" / "model" / "metadata.json").is_file()


@two_gpus
def test_checkpoint_from_two_data_parallel_ranks_resumes_on_one(model_dir, tmp_path):
    """The optimizer state is saved fully reshardable: a run saved with DP=2 goes on with DP=1 as it would have."""
    flags = ("--save", str(tmp_path / "ckpt"), "--load", str(tmp_path / "ckpt"))
    first, second = random_batch(8, seed=5), random_batch(8, seed=6)
    with _megatron(model_dir, *flags, "--actor-num-gpus-per-node", "2") as two:
        assert two.load() is None
        two.train_step(first, rollout_id=0)
        two.save(0)
        saved = two.parameter_checksum()
        continued = two.train_step(second, rollout_id=1).steps[0]
        continued_sum = two.parameter_checksum()
    with _megatron(model_dir, *flags) as one:
        assert one.load() == 0
        assert one.parameter_checksum() == saved
        again = one.train_step(second, rollout_id=1).steps[0]
        resumed_sum = one.parameter_checksum()
    report(
        reshard_loss_rel=_rel(again["loss"], continued["loss"]),
        reshard_sum_rel=_rel(resumed_sum[1], continued_sum[1]),
    )
    assert again["loss"] == pytest.approx(continued["loss"], rel=1e-4, abs=1e-6)
    assert resumed_sum == pytest.approx(continued_sum, rel=1e-5)


def test_ppo_critic_matches_the_torch_backend_and_resumes(model_dir, tmp_path):
    """PPO with a Megatron critic (value head replicated over TP) started from the same token-classification
    checkpoint as the torch backend's critic: same values, so the same value loss and actor loss; the critic's
    checkpoint (``<save>/critic``) resumes exactly."""
    from transformers import AutoModelForTokenClassification

    critic = tmp_path / "critic_init"
    torch.manual_seed(0)
    AutoModelForTokenClassification.from_pretrained(model_dir, num_labels=1).save_pretrained(critic)
    ppo = ("--advantage-estimator", "ppo", "--critic-load", str(critic), "--critic-lr", "1e-3")
    first, second = random_batch(8, seed=41, prompt=(4, 12), response=(4, 12)), random_batch(8, seed=42)
    with TorchTrainer(trainer_args(model_dir, *STEP, *ppo)) as torch_trainer:
        ref = torch_trainer.train_step(first, rollout_id=0)
    ckpt = ("--save", str(tmp_path / "ckpt"), "--load", str(tmp_path / "ckpt"))
    with _megatron(model_dir, *ppo, *ckpt) as trainer:
        got = trainer.train_step(first, rollout_id=0)
        trainer.save(0)
        continued = trainer.train_step(second, rollout_id=1)
    report(
        critic_value_loss_rel=_rel(got.critic_steps[0]["value_loss"], ref.critic_steps[0]["value_loss"]),
        critic_grad_norm_rel=_rel(got.critic_steps[0]["grad_norm"], ref.critic_steps[0]["grad_norm"]),
        ppo_actor_loss_rel=_rel(got.steps[0]["loss"], ref.steps[0]["loss"]),
    )
    assert got.critic_steps[0]["value_loss"] == pytest.approx(ref.critic_steps[0]["value_loss"], rel=1e-3)
    assert got.critic_steps[0]["grad_norm"] == pytest.approx(ref.critic_steps[0]["grad_norm"], rel=1e-3)
    assert got.steps[0]["loss"] == pytest.approx(ref.steps[0]["loss"], rel=1e-3, abs=1e-6)
    assert (tmp_path / "ckpt" / "critic" / "iter_0000000" / "model" / "metadata.json").is_file()
    # Resuming, --critic-load names the critic's checkpoints (slime's meaning), not its starting weights.
    resume = (
        "--advantage-estimator",
        "ppo",
        "--critic-load",
        str(tmp_path / "ckpt" / "critic"),
        "--critic-lr",
        "1e-3",
    )
    with _megatron(model_dir, *resume, *ckpt) as resumed:
        assert resumed.load() == 0
        again = resumed.train_step(second, rollout_id=1)
    assert again.critic_steps[0]["value_loss"] == pytest.approx(
        continued.critic_steps[0]["value_loss"], rel=1e-6
    )
    assert again.steps[0]["loss"] == pytest.approx(continued.steps[0]["loss"], rel=1e-6, abs=1e-8)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_offload_frees_the_gpu_and_changes_no_result(model_dir, precision):
    """``--offload``: buffers, main weights and moments leave the GPU (in fp32 the main weights are views of the
    parameter buffer, in bf16 tensors of their own: both must come back wired to the model)."""
    flags = ("--bf16",) if precision == "bf16" else ()
    batches = [random_batch(8, seed=21), random_batch(8, seed=22)]
    with _megatron(model_dir, *flags) as plain:
        expected = [plain.train_step(b, rollout_id=i).steps[0] for i, b in enumerate(batches)]
        expected_sum = plain.parameter_checksum()
    params = sum(t.numel() for t in checkpoint.read_hf_weights(model_dir, flag="--hf-checkpoint").values())
    with _megatron(model_dir, "--offload", *flags) as trainer:
        steps = [trainer.train_step(batches[0], rollout_id=0).steps[0]]
        before = trainer.parameter_checksum()
        resident = trainer.onload()[0]
        left = trainer.offload()[0]
        # Parameters, gradients (fp32) and both moments: at least 16 bytes a parameter leave the GPU.
        report(**{f"offload_{precision}_freed_bytes_per_param": (resident - left) / params})
        assert resident - left >= 16 * params, (resident, left, params)
        assert trainer.parameter_checksum() == before  # read while offloaded
        trainer.onload()
        trainer.offload()
        steps.append(trainer.train_step(batches[1], rollout_id=1).steps[0])
        assert trainer.parameter_checksum() == pytest.approx(expected_sum, rel=1e-6)
    for ours, theirs in zip(steps, expected, strict=True):
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-6, abs=1e-8)


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory) -> Path:
    return build_tiny_model(
        tmp_path_factory.mktemp("megatron") / "qwen3_moe",
        arch="qwen3_moe",
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=32,
        num_experts=8,
        num_experts_per_tok=2,
        corpus=default_corpus(lines=200),
    )


@pytest.mark.parametrize("recompute", ["none", "full"])
def test_routing_replay_trains_on_the_recorded_routes(moe_dir, monkeypatch, recompute):
    """The old policy's pass records every token's experts; both optimizer steps of the rollout route exactly so,
    packed differently (other micro-batches than the log-prob pass), the second after the weights have moved. Under
    full recomputation the backward pass's rerun of every training forward routes so too."""
    from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction

    from services.core.net import free_port
    from trainer.backends.megatron_backend.worker import MegatronTrainWorker
    from trainer.backends.torch_backend.worker import ACTOR, DistInit

    calls: list[tuple[RouterReplayAction | None, int, torch.Tensor]] = []
    original = RouterReplay.get_replay_topk

    def spy(self, scores, topk, num_groups=None, group_topk=None, default_compute_topk=None):
        probs, indices = original(self, scores, topk, num_groups, group_topk, default_compute_topk)
        layer = RouterReplay.global_router_replay_instances.index(self)
        calls.append((self.router_replay_action, layer, indices.sort(dim=1).values.cpu()))
        return probs, indices

    monkeypatch.setattr(RouterReplay, "get_replay_topk", spy)
    args = trainer_args(
        moe_dir,
        "--train-backend", "megatron", "--use-routing-replay",
        "--global-batch-size", "4", "--use-dynamic-batch-size",
        "--max-tokens-per-gpu", "24", "--log-probs-max-tokens-per-gpu", "200",
        "--lr", "3e-2", "--use-kl-loss", "--kl-loss-coef", "0.1",
        *(FULL_RECOMPUTE if recompute == "full" else ()),
    )  # fmt: skip
    worker = MegatronTrainWorker(
        args, role=ACTOR, rank=0, world_size=1, dist_init=DistInit("127.0.0.1", free_port())
    )
    try:
        batch = random_batch(8, seed=11, prompt=(4, 10), response=(3, 8))
        forwards: list[list[int]] = []
        inner_forward = worker._forward

        def forward(local, positions):
            forwards.append(list(positions))
            return inner_forward(local, positions)

        monkeypatch.setattr(worker, "_forward", forward)
        worker.prepare(batch)
        recorded = {i: r.long().sort(dim=2).values.cpu() for i, r in worker.routing.routes.items()}
        layers = len(RouterReplay.global_router_replay_instances)
        assert layers == 2 and sorted(recorded) == list(range(8))
        prepare_calls = len(calls)
        # The reference pass routes freely (one call per layer per forward), the old policy's pass records.
        assert {a for a, _, _ in calls} == {None, RouterReplayAction.RECORD}
        worker.train(rollout_id=0)
        train_calls = calls[prepare_calls:]
        forward_calls = [c for c in train_calls if c[0] is RouterReplayAction.REPLAY_FORWARD]
        backward_calls = [c for c in train_calls if c[0] is RouterReplayAction.REPLAY_BACKWARD]
        assert len(forward_calls) + len(backward_calls) == len(train_calls)
        # Full recomputation reruns every layer (one per checkpoint) of every training forward in the backward pass.
        assert len(backward_calls) == (len(forward_calls) if recompute == "full" else 0)
        train_forwards = forwards[-(len(forward_calls) // layers) :]
        assert len(train_forwards) > 2  # micro-batches of at most 24 tokens, over two optimizer steps
        for k, positions in enumerate(train_forwards):
            expected = torch.cat([recorded[i] for i in positions])
            for layer in range(layers):
                _, got_layer, used = forward_calls[k * layers + layer]
                assert got_layer == layer and torch.equal(used, expected[:, layer]), (k, layer)
            if backward_calls:
                # The backward recomputes the layers last to first.
                rerun = {
                    got_layer: used for _, got_layer, used in backward_calls[k * layers : (k + 1) * layers]
                }
                assert sorted(rerun) == list(range(layers))
                for layer in range(layers):
                    assert torch.equal(rerun[layer], expected[:, layer]), ("backward", k, layer)
        # Free routing under the trained weights differs for some tokens: replay is what kept them.
        calls.clear()
        worker.compute_log_probs(batch)
        assert {action for action, _, _ in calls} == {None}
        moved = total = 0
        for k, positions in enumerate(forwards[-(len(calls) // layers) :]):
            expected = torch.cat([recorded[i] for i in positions])
            for layer in range(layers):
                used = calls[k * layers + layer][2]
                moved += int((used != expected[:, layer]).any(dim=1).sum())
                total += len(used)
        report(routing_moved_fraction=moved / total)
        assert moved > 0
    finally:
        worker.shutdown()


@pytest.fixture(scope="module")
def deep_dir(tmp_path_factory) -> Path:
    """Four wider layers: long sequences make the activations, not the weights, the bulk of training's memory."""
    return build_tiny_model(
        tmp_path_factory.mktemp("megatron") / "qwen2_deep",
        arch="qwen2",
        hidden_size=256,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=1024,
        corpus=default_corpus(lines=200),
    )


RECOMPUTE = {
    "none": (),
    "selective": ("--recompute-granularity", "selective"),
    "full_uniform": (
        "--recompute-granularity",
        "full",
        "--recompute-method",
        "uniform",
        "--recompute-num-layers",
        "1",
    ),
    "full_block": (
        "--recompute-granularity",
        "full",
        "--recompute-method",
        "block",
        "--recompute-num-layers",
        "4",
    ),
}


def test_recompute_changes_no_result_and_full_recompute_saves_memory(deep_dir):
    """Each rank in this process in turn, so the test reads its peak GPU memory of one training step."""
    from services.core.net import free_port
    from trainer.backends.megatron_backend.worker import MegatronTrainWorker
    from trainer.backends.torch_backend.worker import ACTOR, DistInit

    batch = random_batch(8, seed=13, prompt=(150, 250), response=(100, 200))
    runs = {}
    for name, flags in RECOMPUTE.items():
        args = trainer_args(deep_dir, *STEP, *flags, "--train-backend", "megatron")
        worker = MegatronTrainWorker(
            args, role=ACTOR, rank=0, world_size=1, dist_init=DistInit("127.0.0.1", free_port())
        )
        try:
            assert worker.config.recompute_granularity == (flags[1] if flags else None)
            worker.prepare(batch)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            resident = torch.cuda.memory_allocated()
            step = worker.train(rollout_id=0)["steps"][0]
            peak = torch.cuda.max_memory_allocated() - resident
            log_probs = _flat([lp for _, lp in sorted(worker.compute_log_probs(batch).items())])
            runs[name] = {"step": step, "peak": peak, "lp": log_probs, "sum": worker.parameter_checksum()}
        finally:
            worker.shutdown()
    base = runs["none"]
    for name, run in runs.items():
        report(
            **{
                f"recompute_{name}_peak_ratio": run["peak"] / base["peak"],
                f"recompute_{name}_loss_rel": _rel(run["step"]["loss"], base["step"]["loss"]),
                f"recompute_{name}_grad_norm_rel": _rel(run["step"]["grad_norm"], base["step"]["grad_norm"]),
                f"recompute_{name}_logprob_after_max_abs": (run["lp"] - base["lp"]).abs().max().item(),
            }
        )
        assert run["step"]["loss"] == pytest.approx(base["step"]["loss"], rel=1e-6, abs=1e-8)
        assert run["step"]["grad_norm"] == pytest.approx(base["step"]["grad_norm"], rel=1e-5)
        assert (run["lp"] - base["lp"]).abs().max().item() < 1e-5
        assert run["sum"] == pytest.approx(base["sum"], rel=1e-6)
    assert runs["full_uniform"]["peak"] < 0.8 * base["peak"]
    assert runs["full_block"]["peak"] < 0.8 * base["peak"]


# Two-GPU layouts: (model fixture, flags of both runs, flags of the two-GPU run).
PPO = ("--advantage-estimator", "ppo", "--critic-lr", "1e-3")
FULL_RECOMPUTE = (
    "--recompute-granularity",
    "full",
    "--recompute-method",
    "uniform",
    "--recompute-num-layers",
    "1",
)
PP2 = ("--pipeline-model-parallel-size", "2")
CP2 = ("--context-parallel-size", "2")
LAYOUTS = {
    "tp2": ("model_dir", (), ("--tensor-model-parallel-size", "2")),
    "dp2": ("model_dir", (), ()),
    "tp2_sequence_parallel": ("model_dir", (), ("--tensor-model-parallel-size", "2", "--sequence-parallel")),
    "moe_ep2": ("moe_dir", (), ("--expert-model-parallel-size", "2")),
    "moe_tp2_sequence_parallel_routing_replay": (
        "moe_dir",
        ("--use-routing-replay",),
        ("--tensor-model-parallel-size", "2", "--sequence-parallel"),
    ),
    "pp2": ("model_dir", (), PP2),
    "pp2_bf16": ("model_dir", ("--bf16",), PP2),
    "pp2_full_recompute": ("model_dir", FULL_RECOMPUTE, PP2),
    "pp2_ppo_critic": ("model_dir", PPO, PP2),
    "moe_pp2_routing_replay": ("moe_dir", ("--use-routing-replay",), PP2),
    "moe_pp2_full_recompute_routing_replay": ("moe_dir", ("--use-routing-replay", *FULL_RECOMPUTE), PP2),
    "pp2_uneven": ("deep_dir", (), (*PP2, "--decoder-first-pipeline-num-layers", "1")),
    "cp2": ("model_dir", (), CP2),
    "cp2_bf16": ("model_dir", ("--bf16",), CP2),
    "cp2_selective_recompute": ("model_dir", ("--recompute-granularity", "selective"), CP2),
    "cp2_ppo_critic": ("model_dir", PPO, CP2),
    "cp2_dynamic_batch": ("model_dir", ("--use-dynamic-batch-size", "--max-tokens-per-gpu", "40"), CP2),
    "moe_cp2_routing_replay": ("moe_dir", ("--use-routing-replay",), CP2),
}


# The signed sum of the parameters after the step, relative: Adam's first step moves every weight by about ±lr
# whatever the size of its gradient, so a weight whose gradient is near zero may step the other way when the
# gradient is summed in another order. Under context parallelism in bf16 each rank's weight gradients come from
# half of the tokens, each half rounded to bf16 by its GEMM before the fp32 sum.
SIGNED_SUM_REL = {"cp2_bf16": 1e-4}


# Four-GPU layouts: tensor and pipeline parallelism together, data parallelism over pipelines, four stages.
FOUR_GPU_LAYOUTS = {
    "tp2_pp2": ("model_dir", (), ("--tensor-model-parallel-size", "2", *PP2)),
    "dp2_pp2": ("model_dir", (), PP2),
    "pp4": ("deep_dir", (), ("--pipeline-model-parallel-size", "4")),
    "tp2_cp2_sequence_parallel": (
        "model_dir",
        (),
        ("--tensor-model-parallel-size", "2", "--sequence-parallel", *CP2),
    ),
    "cp2_pp2": ("model_dir", (), (*CP2, *PP2)),
    "dp2_cp2": ("model_dir", (), CP2),
    "cp4": ("model_dir", (), ("--context-parallel-size", "4")),
}


@two_gpus
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_two_gpus_give_the_loss_of_one(request, layout):
    _compare_with_one_gpu(request, layout, *LAYOUTS[layout], gpus=2)


@four_gpus
@pytest.mark.parametrize("layout", sorted(FOUR_GPU_LAYOUTS))
def test_four_gpus_give_the_loss_of_one(request, layout):
    _compare_with_one_gpu(request, layout, *FOUR_GPU_LAYOUTS[layout], gpus=4)


def _compare_with_one_gpu(request, layout, fixture, common, parallel, *, gpus):
    model = request.getfixturevalue(fixture)
    # Odd sequence lengths: under sequence parallelism some packed rows need padding.
    batch = random_batch(8, seed=7, prompt=(4, 12), response=(4, 12))
    with _megatron(model, *common) as single:
        one_lp = _flat(single.compute_log_probs(batch))
        one_result = single.train_step(batch, rollout_id=0)
        one_sum = single.parameter_checksum()
    with _megatron(model, *common, "--actor-num-gpus-per-node", str(gpus), *parallel) as double:
        two_lp = _flat(double.compute_log_probs(batch))
        two_result = double.train_step(batch, rollout_id=0)
        two_sum = double.parameter_checksum()
    one, two = one_result.steps[0], two_result.steps[0]
    report(
        **{
            f"{layout}_logprob_max_abs": (two_lp - one_lp).abs().max().item(),
            f"{layout}_loss_rel": _rel(two["loss"], one["loss"]),
            f"{layout}_grad_norm_rel": _rel(two["grad_norm"], one["grad_norm"]),
            f"{layout}_sum_rel": _rel(two_sum[0], one_sum[0]),
            f"{layout}_square_sum_rel": _rel(two_sum[1], one_sum[1]),
        }
    )
    assert (two_lp - one_lp).abs().max().item() < 1e-4
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-4, abs=1e-6)
    assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-3)
    assert two_sum[0] == pytest.approx(one_sum[0], rel=SIGNED_SUM_REL.get(layout, 1e-5))
    assert two_sum[1] == pytest.approx(one_sum[1], rel=1e-5)
    assert two_result.rollout == pytest.approx(one_result.rollout, rel=1e-4, abs=1e-6)
    if one_result.critic_steps:
        one_critic, two_critic = one_result.critic_steps[0], two_result.critic_steps[0]
        report(**{f"{layout}_value_loss_rel": _rel(two_critic["value_loss"], one_critic["value_loss"])})
        assert two_critic["value_loss"] == pytest.approx(one_critic["value_loss"], rel=1e-4)
        assert two_critic["grad_norm"] == pytest.approx(one_critic["grad_norm"], rel=1e-3)


@contextlib.contextmanager
def _cpu_engine(model_dir: Path, log_dir: Path) -> Iterator[str]:
    """A built-in rollout engine on CPU on loopback, serving ``model_dir``; yields its base URL."""
    with engine_process(
        model_dir, log_dir, "--num-threads", "2", "--engine-backend", "builtin", "--engine-device", "cpu"
    ) as engine:
        yield engine.url


def _engine_gap(trainer, engine_url: str) -> float:
    """Largest gap between the engine's log-probs of its own samples and the trainer's for the same tokens."""
    from tests.trainer.weight_sync.test_weight_sync import engine_rollout, max_gap

    return max_gap(trainer, engine_rollout(engine_url))


@two_gpus
@pytest.mark.parametrize("layout", ["pp2", "cp2"])
def test_two_rank_layouts_export_resume_and_push_the_whole_model(model_dir, tmp_path, layout):
    """PP=2 (the tied word embeddings on both stages) and CP=2: the Hugging Face export gathers the whole model
    bitwise, a saved checkpoint resumes into the same next step, and a weight push (disk transport) gives a real
    engine on loopback the trained weights."""
    flags = (
        "--actor-num-gpus-per-node", "2", *(PP2 if layout == "pp2" else CP2), "--lr", "2e-2",
        "--save", str(tmp_path / "ckpt"), "--load", str(tmp_path / "ckpt"),
    )  # fmt: skip
    first, second = random_batch(8, seed=5), random_batch(8, seed=6)
    with _cpu_engine(model_dir, tmp_path) as engine_url:
        with _megatron(model_dir, *flags) as trainer:
            assert trainer.load() is None
            exported = _state(trainer, tmp_path / "export")
            original = checkpoint.read_hf_weights(model_dir, flag="--hf-checkpoint")
            assert sorted(exported) == sorted(original)
            assert all(torch.equal(exported[k], original[k]) for k in original)
            trainer.train_step(first, rollout_id=0)
            trainer.save(0)
            saved = trainer.parameter_checksum()
            continued = trainer.train_step(second, rollout_id=1).steps[0]
            continued_sum = trainer.parameter_checksum()
            stale = _engine_gap(trainer, engine_url)
            trainer.update_weights([engine_url], transport="disk", disk_dir=str(tmp_path / "push"))
            pushed = _engine_gap(trainer, engine_url)
        with _megatron(model_dir, *flags) as resumed:
            assert resumed.load() == 0
            assert resumed.parameter_checksum() == saved
            again = resumed.train_step(second, rollout_id=1).steps[0]
            resumed_sum = resumed.parameter_checksum()
    report(
        **{
            f"{layout}_push_gap_before": stale,
            f"{layout}_push_gap_after": pushed,
            f"{layout}_resume_loss_rel": _rel(again["loss"], continued["loss"]),
        }
    )
    assert stale > 1e-2 and pushed < 1e-3
    assert again["loss"] == pytest.approx(continued["loss"], rel=1e-6, abs=1e-8)
    assert resumed_sum == pytest.approx(continued_sum, rel=1e-6)


@two_gpus
@pytest.mark.parametrize("offload", [False, True], ids=["resident", "offload"])
def test_slime_train_with_megatron_and_nccl_weight_sync(model_dir, tmp_path, offload):
    from trainer.quickstart.task import split_problems, write_jsonl

    train, _ = split_problems(9, eval_size=4)
    write_jsonl(train, tmp_path / "train.jsonl")
    out = tmp_path / "run"
    argv = [
        "train", "--train-backend", "megatron",
        "--hf-checkpoint", str(model_dir),
        "--prompt-data", str(tmp_path / "train.jsonl"), "--input-key", "prompt", "--label-key", "label",
        "--rm-type", "math",
        "--rollout-batch-size", "2", "--n-samples-per-prompt", "2", "--num-rollout", "3",
        "--rollout-max-response-len", "6",
        "--actor-num-gpus-per-node", "1", "--rollout-num-gpus", "1",
        "--lr", "1e-4", "--use-kl-loss", "--kl-loss-coef", "0.01",
        "--output-dir", str(out), "--run-id", out.name, "--port", "0", "--log-level", "INFO",
        "--save-debug-rollout-data", str(out / "debug" / "rollout_{rollout_id}.pt"),
        *(["--offload"] if offload else []),
    ]  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "services.cli", *argv],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])},
        capture_output=True,
        text=True,
        timeout=500,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rollouts = [r for r in records if "rollout/step" in r]
    assert [r["rollout_id"] for r in rollouts] == [0, 1, 2]
    assert rollouts[0]["train/kl_loss"] == 0.0 and rollouts[0]["train/ppo_kl"] == 0.0
    assert all(r["perf/weight_sync_seconds"] > 0 for r in rollouts)
    for rollout_id in range(3):
        samples = torch.load(out / "debug" / f"rollout_{rollout_id}.pt", weights_only=False)["samples"]
        assert all(s["weight_versions"] == [str(rollout_id + 1)] for s in samples)
    assert "(nccl, 2 ranks)" in result.stderr
    assert "megatron actor rank 0/1" in result.stderr
    report(
        e2e_first_kl_loss=rollouts[0]["train/kl_loss"],
        e2e_weight_sync_seconds=rollouts[-1]["perf/weight_sync_seconds"],
    )
