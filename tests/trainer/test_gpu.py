"""The torch backend and weight sync on CUDA: NCCL for FSDP2 and for the engine group, CUDA IPC for colocated
engines. Skipped without a GPU; the NCCL cases need two (NCCL refuses two ranks on one device)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest
import torch

from services.core.net import free_port, wait_http_ok
from tests.trainer.helpers import random_batch, trainer_args
from trainer.backends.batch import RolloutBatch
from trainer.backends.torch_backend import TorchTrainer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")


def test_first_step_on_cuda_is_on_policy_in_bf16(tiny_model_dir):
    args = trainer_args(
        tiny_model_dir,
        "--bf16",
        "--use-kl-loss",
        "--kl-loss-coef",
        "0.1",
        "--micro-batch-size",
        "2",
        "--lr",
        "1e-3",
    )
    with TorchTrainer(args) as trainer:
        result = trainer.train_step(random_batch(8), rollout_id=0)
    assert result.steps[0]["ppo_kl"] == 0.0
    assert result.steps[0]["kl_loss"] == 0.0
    assert result.rollout["kl"] == 0.0


@two_gpus
def test_two_nccl_ranks_match_one_rank(tiny_model_dir):
    flags = ("--global-batch-size", "8", "--micro-batch-size", "2", "--lr", "1e-2", "--normalize-advantages")
    batch = random_batch(8, seed=4)
    with TorchTrainer(trainer_args(tiny_model_dir, *flags)) as single:
        one = single.train_step(batch, rollout_id=0).steps[0]
        one_params = single.parameter_checksum()
    args = trainer_args(tiny_model_dir, *flags)
    args.actor_num_gpus_per_node = 2
    with TorchTrainer(args) as double:
        two = double.train_step(batch, rollout_id=0).steps[0]
        assert double.parameter_checksum() == pytest.approx(one_params, rel=1e-5)
    assert two["ppo_kl"] == 0.0
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-4, abs=1e-5)


def _engine(model_dir, gpu: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(gpu)}
    argv = [
        sys.executable, "-m", "services.rollout_engine.server", "--hf-checkpoint", str(model_dir), "--port",
        str(port), "--engine-backend", "builtin", "--engine-device", "cuda", "--engine-dtype", "float32",
        "--kv-cache-memory-gb", "1", "--sglang-disable-cuda-graph",
    ]  # fmt: skip
    proc = subprocess.Popen(argv, env=env)
    wait_http_ok(f"http://127.0.0.1:{port}/health", timeout=300)
    return proc, f"http://127.0.0.1:{port}"


@pytest.fixture
def engines(tiny_model_dir) -> Iterator[dict[str, str]]:
    started = [_engine(tiny_model_dir, 0)]
    if torch.cuda.device_count() > 1:
        started.append(_engine(tiny_model_dir, 1))
    yield {"colocated": started[0][1], "remote": started[-1][1]}
    for proc, _ in started:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _gap(trainer: TorchTrainer, url: str) -> float:
    prompt = [5, 17, 33, 2, 9]
    body = {
        "input_ids": prompt,
        "sampling_params": {"max_new_tokens": 8, "ignore_eos": True},
        "return_logprob": True,
    }
    out = httpx.post(f"{url}/generate", json=body, timeout=60).json()["meta_info"]["output_token_logprobs"]
    batch = RolloutBatch(
        tokens=[prompt + [t for _, t, *_ in out]],
        response_lengths=[len(out)],
        rewards=[0.0],
        loss_masks=[[1] * len(out)],
    )
    return max(abs(a - lp) for a, (lp, *_) in zip(trainer.compute_log_probs(batch)[0], out, strict=True))


def test_cuda_ipc_and_nccl_weight_sync(tiny_model_dir, engines, tmp_path):
    args = trainer_args(tiny_model_dir, "--lr", "5e-2", "--update-weight-buffer-size", "20000")
    transports = [("tensor", engines["colocated"]), ("disk", engines["remote"])]
    if torch.cuda.device_count() > 1:
        transports.append(("distributed", engines["remote"]))
    with TorchTrainer(args) as trainer:
        for i, (transport, url) in enumerate(transports):
            trainer.train_step(random_batch(8, seed=i), rollout_id=i)
            assert _gap(trainer, url) > 1e-3
            report = trainer.update_weights([url], transport=transport, disk_dir=str(tmp_path))
            assert _gap(trainer, url) < 1e-4, transport
            assert report.buckets > 1


def test_offload_frees_the_trainers_gpu_memory_and_changes_no_result(tmp_path):
    from services.core.tiny_model import build_tiny_model, default_corpus

    model = build_tiny_model(
        tmp_path / "model", hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=1024,
        corpus=default_corpus(lines=200),
    )  # fmt: skip
    flags = ("--lr", "1e-3", "--lr-decay-style", "constant")
    batches = [random_batch(8, seed=s) for s in range(2)]
    with TorchTrainer(trainer_args(model, *flags)) as plain:
        expected = [plain.train_step(b, rollout_id=i).steps for i, b in enumerate(batches)]
        expected_params = plain.parameter_checksum()
    with TorchTrainer(trainer_args(model, "--offload", *flags)) as trainer:
        steps = [trainer.train_step(batches[0], rollout_id=0).steps]
        resident = torch.cuda.memory_allocated()
        left = trainer.offload()[0]
        # Parameters and AdamW's two moments (3 × 4 bytes a parameter) leave the device.
        params = sum(p.numel() for p in trainer.actor._local.model.parameters())
        assert resident - left >= 3 * 4 * params, (resident, left, params)
        assert trainer.onload()[0] >= resident - 1024
        trainer.offload()
        steps.append(trainer.train_step(batches[1], rollout_id=1).steps)
        assert trainer.parameter_checksum() == pytest.approx(expected_params, rel=1e-6)
    for ours, theirs in zip(steps, expected, strict=True):
        assert ours[0]["loss"] == pytest.approx(theirs[0]["loss"], rel=1e-5, abs=1e-7)


@two_gpus
def test_nccl_push_from_an_offloaded_trainer_then_engine_log_probs_equal_the_trainers(tiny_model_dir):
    """--offload with an on-policy engine on the other GPU: the engine sleeps while the trainer trains, the weights
    go out over NCCL from host memory, and the engine's log-probs are the trainer's, bit for bit."""
    from trainer.offload import EngineMemory

    port = free_port()
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "1"}
    argv = [
        sys.executable, "-m", "services.rollout_engine.server", "--hf-checkpoint", str(tiny_model_dir), "--port",
        str(port), "--engine-backend", "builtin", "--engine-device", "cuda", "--engine-dtype", "float32",
        "--kv-cache-memory-gb", "1", "--sglang-rl-on-policy-target", "fsdp",
    ]  # fmt: skip
    proc = subprocess.Popen(argv, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http_ok(f"{url}/health", timeout=300)
        memory = EngineMemory()
        args = trainer_args(
            tiny_model_dir, "--offload", "--lr", "5e-2", "--update-weight-buffer-size", "20000"
        )
        with TorchTrainer(args) as trainer:
            memory.release([url])
            trainer.train_step(random_batch(8, seed=5), rollout_id=0)
            memory.push_weights(
                [url], trainer, lambda: trainer.update_weights([url], transport="distributed")
            )
            assert trainer.offloaded
            prompt = [5, 17, 33, 2, 9]
            body = {"input_ids": prompt, "sampling_params": {"max_new_tokens": 8, "ignore_eos": True}}
            out = httpx.post(f"{url}/generate", json={**body, "return_logprob": True}, timeout=60).json()
            out = out["meta_info"]["output_token_logprobs"]
            batch = RolloutBatch(
                tokens=[prompt + [t for _, t, *_ in out]],
                response_lengths=[len(out)],
                rewards=[0.0],
                loss_masks=[[1] * len(out)],
            )
            ours = torch.tensor(trainer.compute_log_probs(batch)[0])
            theirs = torch.tensor([lp for lp, *_ in out])
            print(
                f"NCCL push, on-policy engine vs trainer: max |diff| {(ours - theirs).abs().max().item():.3g}"
            )
            assert torch.equal(ours, theirs)
    finally:
        proc.terminate()
        proc.wait(timeout=20)
