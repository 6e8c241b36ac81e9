"""``--offload`` against a real engine process: the release/resume calls arrive in slime's order (as the engine
itself records them), generation after a sleep/wake cycle is what it was before, and training does not notice."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from services.core.net import free_port, wait_http_ok
from tests.trainer.helpers import driver_argv, random_batch, run_slime, trainer_args
from trainer.backends.torch_backend import TorchTrainer
from trainer.offload import EngineMemory

ALL_TAGS = ["weights", "kv_cache", "cuda_graph"]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def engine_url(tiny_model_dir) -> Iterator[str]:
    port = free_port()
    argv = [sys.executable, "-m", "services.rollout_engine.server", "--hf-checkpoint", str(tiny_model_dir)]
    proc = subprocess.Popen([*argv, "--port", str(port), "--num-threads", "1", "--engine-backend", "builtin"])
    try:
        wait_http_ok(f"http://127.0.0.1:{port}/health", timeout=180)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def _state(url: str) -> dict:
    return httpx.get(f"{url}/get_server_info", timeout=10).json()["internal_states"][0]


def _generate(url: str) -> list[list]:
    """Two seeded samples with their log-probs."""
    outs = []
    for seed, prompt in enumerate(([5, 17, 33, 2, 9], [100, 4, 8, 61])):
        params = {"temperature": 1.0, "max_new_tokens": 6, "ignore_eos": True, "sampling_seed": seed}
        body = {"input_ids": prompt, "sampling_params": params, "return_logprob": True}
        outs.append(
            httpx.post(f"{url}/generate", json=body, timeout=60).json()["meta_info"]["output_token_logprobs"]
        )
    return outs


def test_offload_cycle_runs_in_slimes_order_and_changes_no_result(tiny_model_dir, engine_url):
    base = ("--lr", "5e-2", "--lr-decay-style", "constant")
    memory = EngineMemory()
    with (
        TorchTrainer(trainer_args(tiny_model_dir, "--offload", *base)) as trainer,
        TorchTrainer(trainer_args(tiny_model_dir, *base)) as plain,
    ):

        def push():
            return trainer.update_weights([engine_url], transport="tensor")

        # The driver's sequence: release at start-up, then per rollout: push (waking the engines) → generate →
        # release → train.
        memory.release([engine_url])
        assert sorted(_state(engine_url)["released_tags"]) == sorted(ALL_TAGS)
        for rollout_id in range(2):
            memory.push_weights([engine_url], trainer, push)
            assert trainer.offloaded and _state(engine_url)["released_tags"] == []
            _generate(engine_url)
            memory.release([engine_url])
            batch = random_batch(8, seed=rollout_id)
            assert trainer.train_step(batch, rollout_id).steps == plain.train_step(batch, rollout_id).steps
            assert not trainer.offloaded
        assert trainer.parameter_checksum() == plain.parameter_checksum()

        memory.push_weights([engine_url], trainer, push)
        before_sleep = _generate(engine_url)
        # A sleep/wake cycle with the same weights pushed again gives the same tokens and log-probs.
        memory.release([engine_url])
        memory.push_weights([engine_url], trainer, push)
        assert _generate(engine_url) == before_sleep

    def cycle(version: int) -> list[tuple]:
        """One push under --offload, then the release after the rollout; each event with the version it saw."""
        return [
            ("resume", ["weights"], version - 1 if version > 1 else "default"),
            ("resume", ["cuda_graph"], version),
            ("resume", ["kv_cache"], version),
            ("release", ALL_TAGS, version),
        ]

    expected = [("release", ALL_TAGS, "default"), *cycle(1), *cycle(2), *cycle(3), *cycle(4)[:-1]]
    log = [(e["action"], e["tags"], e["weight_version"]) for e in _state(engine_url)["memory_log"]]
    assert log == [(a, t, str(v)) for a, t, v in expected]
    metrics = httpx.get(f"{engine_url}/metrics", timeout=10).text
    assert 'slime_rollout_engine_memory_occupation_total{action="release",tag="weights"} 4.0' in metrics


@pytest.mark.slow
def test_slime_train_with_offload_sleeps_the_engines_while_it_trains(tmp_path):
    from services.core.tiny_model import build_tiny_model
    from trainer.quickstart.task import split_problems, write_jsonl

    build_tiny_model(tmp_path / "model", hidden_size=32, num_layers=2, seed=0)
    write_jsonl(split_problems(6, eval_size=2)[0], tmp_path / "train.jsonl")
    out = tmp_path / "out"
    argv = [
        *driver_argv(tmp_path, out, rollouts=2),
        "--offload",
        "--rollout-data-postprocess-path", "tests.trainer.offload_plugins.record_engine_memory",
    ]  # fmt: skip
    result = run_slime(tmp_path, "train", argv)
    assert result.returncode == 0, result.stderr[-3000:]

    records = [
        json.loads(line)[0]
        for line in (tmp_path / "plugins" / "engine_memory.jsonl").read_text().splitlines()
    ]
    assert len(records) == 2
    # While the trainer trains, the engine holds nothing; before that, it slept and woke in slime's order.
    assert all(sorted(r["released_tags"]) == sorted(ALL_TAGS) for r in records)
    log = [(e["action"], e["tags"], e["weight_version"]) for e in records[-1]["memory_log"]]
    assert log == [
        ("release", ALL_TAGS, "default"),
        ("resume", ["weights"], "default"),
        ("resume", ["cuda_graph"], "1"),
        ("resume", ["kv_cache"], "1"),
        ("release", ALL_TAGS, "1"),
        ("resume", ["weights"], "1"),
        ("resume", ["cuda_graph"], "2"),
        ("resume", ["kv_cache"], "2"),
        ("release", ALL_TAGS, "2"),
    ]
