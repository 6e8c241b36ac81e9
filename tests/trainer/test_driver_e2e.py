"""`slime train` / `slime train-async` end to end on a tiny model: every service a real child process, Redis real,
engines really killed, the driver really killed and resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from services.core.tiny_model import build_tiny_model
from tests.trainer.helpers import driver_argv, driver_env, run_slime
from trainer.quickstart.task import split_problems, write_jsonl

ROOT = Path(__file__).resolve().parents[2]
PLUGINS = "tests.trainer.driver_plugins"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("driver")
    build_tiny_model(root / "model", hidden_size=32, num_layers=2, seed=0)
    build_tiny_model(root / "other_model", hidden_size=32, num_layers=2, seed=1)
    _sharpen(root / "model", factor=40.0)
    train, held_out = split_problems(9, eval_size=4)
    write_jsonl(train, root / "train.jsonl")
    write_jsonl(held_out, root / "eval.jsonl")
    return root


def _sharpen(model_dir: Path, factor: float) -> None:
    """Scale the output projection so the random model is confident, as slime's --ci-test ranges (mean log-prob
    in (-0.5, 0), entropy in (0, 0.5)) assume of a real model."""
    from safetensors.torch import load_file, save_file

    path = model_dir / "model.safetensors"
    weights = load_file(path)
    name = "lm_head.weight" if "lm_head.weight" in weights else "model.embed_tokens.weight"
    weights[name] = weights[name] * factor
    save_file(weights, path, metadata={"format": "pt"})


def _records(out: Path, key: str) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []
    return [r for r in map(json.loads, lines) if key in r]


def _plugin_calls(workdir: Path, name: str) -> list[dict]:
    path = workdir / "plugins" / f"{name}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _debug_samples(out: Path, rollout_id: int | str) -> list[dict]:
    return torch.load(out / "debug" / f"rollout_{rollout_id}.pt", weights_only=False)["samples"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return not (status.exists() and "State:\tZ" in status.read_text())


def test_sync_run_through_every_service_with_plugins_eval_and_ci_checks(workdir: Path) -> None:
    out = workdir / "sync"
    argv = driver_argv(workdir, out, rollouts=3) + [
        "--rollout-function-path", f"{PLUGINS}.rollout",
        "--eval-function-path", "slime.rollout.sglang_rollout.generate_rollout",
        "--custom-generate-function-path", f"{PLUGINS}.generate",
        "--custom-rm-path", f"{PLUGINS}.reward",
        "--dynamic-sampling-filter-path", f"{PLUGINS}.keep_all",
        "--custom-reward-post-process-path", f"{PLUGINS}.post_process",
        "--rollout-data-postprocess-path", f"{PLUGINS}.data_postprocess",
        "--eval-prompt-data", "arith", str(workdir / "eval.jsonl"),
        "--eval-interval", "2",
        "--n-samples-per-eval-prompt", "2",
        "--log-passrate",
        "--use-kl-loss", "--kl-loss-coef", "0.01",
        "--ci-test",
    ]  # fmt: skip
    result = run_slime(workdir, "train", argv)
    assert result.returncode == 0, result.stderr[-3000:]

    rollouts = _records(out, "rollout/step")
    assert [r["rollout_id"] for r in rollouts] == [0, 1, 2]
    assert rollouts[0]["train/kl_loss"] == 0
    for record in rollouts:
        assert record["rollout/raw_reward"] in (0.0, 0.25, 0.5, 0.75, 1.0)
        assert abs(record["train/kl_loss"]) < 1
        assert record["perf/weight_sync_seconds"] > 0
        assert record["rollout/staleness_max"] == 0
    evals = _records(out, "eval/step")
    assert [r["eval/step"] for r in evals] == [0, 2, 3]
    assert all({"eval/arith", "eval/arith-pass@1", "eval/arith-pass@2"} <= set(r) for r in evals)

    train_calls = [c for c in _plugin_calls(workdir, "rollout") if not c["evaluation"]]
    assert [c["rollout_id"] for c in train_calls] == [0, 1, 2]
    assert len(_plugin_calls(workdir, "filter")) == 6
    assert all(c["custom_generate"] for c in _plugin_calls(workdir, "filter"))
    assert len(_plugin_calls(workdir, "post_process")) == 3
    assert len(_plugin_calls(workdir, "data_postprocess")) == 3
    assert len(_plugin_calls(workdir, "reward")) >= 12

    versions = set()
    for rollout_id in range(3):
        samples = _debug_samples(out, rollout_id)
        assert len(samples) == 4
        assert all(s["weight_versions"] == [str(rollout_id + 1)] for s in samples)
        versions |= {v for s in samples for v in s["weight_versions"]}
    assert versions == {"1", "2", "3"}

    manifest = json.loads((out / "logs" / "services.json").read_text())
    assert {"redis", "engine-0", "router", "reward-model", "rollout-buffer"} <= set(manifest)
    assert not any(_alive(entry["pid"]) for entry in manifest.values() if entry["pid"])


def test_debug_rollout_data_trains_without_services_and_ci_test_catches_a_wrong_reference(
    workdir: Path,
) -> None:
    source = workdir / "sync" / "debug" / "rollout_{rollout_id}.pt"
    if not Path(str(source).format(rollout_id=0)).exists():
        pytest.skip("needs the debug rollout data of the sync run")
    common = [
        "--train-backend", "fsdp",
        "--hf-checkpoint", str(workdir / "model"),
        "--prompt-data", str(workdir / "train.jsonl"),
        "--input-key", "prompt",
        "--rollout-batch-size", "2",
        "--n-samples-per-prompt", "2",
        "--num-rollout", "2",
        "--actor-num-gpus-per-node", "1",
        "--distributed-backend", "gloo",
        "--load-debug-rollout-data", str(source),
        "--use-kl-loss", "--kl-loss-coef", "0.01",
        "--ci-test",
        "--port", "0",
    ]  # fmt: skip
    extra = [
        "--log-multi-turn",
        "--save-debug-train-data", str(workdir / "replay" / "train_{rollout_id}_{rank}.pt"),
    ]  # fmt: skip
    good = run_slime(
        workdir, "train", [*common, *extra, "--output-dir", str(workdir / "replay"), "--run-id", "replay"]
    )
    assert good.returncode == 0, good.stderr[-3000:]
    records = _records(workdir / "replay", "rollout/step")
    assert [r["rollout_id"] for r in records] == [0, 1]
    assert all(
        r["multi_turn/raw_response_length/max"] >= r["multi_turn/raw_response_length/min"] for r in records
    )
    assert not (workdir / "replay" / "logs").exists()
    for rollout_id in (0, 1):
        saved = torch.load(workdir / "replay" / f"train_{rollout_id}_0.pt", weights_only=False)
        replayed = _debug_samples(workdir / "sync", rollout_id)
        assert saved["rollout_data"]["tokens"] == [s["tokens"] for s in replayed]

    broken = run_slime(
        workdir,
        "train",
        [
            *common,
            "--output-dir",
            str(workdir / "broken"),
            "--run-id",
            "broken",
            "--ref-load",
            str(workdir / "other_model"),
        ],
    )
    assert broken.returncode != 0
    assert "--ci-test" in broken.stderr


def test_async_run_survives_an_engine_killed_mid_rollout(workdir: Path) -> None:
    out = workdir / "ft"
    argv = driver_argv(workdir, out, rollouts=4, engines=2) + [
        "--use-fault-tolerance",
        "--rollout-health-check-interval", "0.5",
        "--rollout-health-check-timeout", "2",
        "--rollout-health-check-first-wait", "0",
        "--rollout-max-response-len", "24",
    ]  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "train-async", *argv],
        cwd=ROOT,
        env=driver_env(workdir),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        manifest_path = out / "logs" / "services.json"
        deadline = time.monotonic() + 300
        while not _records(out, "rollout/step"):
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "no rollout finished"
            time.sleep(0.2)
        victim = json.loads(manifest_path.read_text())["engine-0"]["pid"]
        os.kill(victim, signal.SIGKILL)
        _, stderr = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    assert [r["rollout_id"] for r in _records(out, "rollout/step")] == [0, 1, 2, 3]
    # Each rollout after the first was generated while the previous one trained: one version behind the weights
    # that train on it.
    assert [r["rollout/staleness_max"] for r in _records(out, "rollout/step")] == [0, 1, 1, 1]
    restarted = json.loads(manifest_path.read_text())["engine-0"]["pid"]
    assert restarted != victim
    assert "relaunching" in stderr
    uids = []
    for rollout_id in range(4):
        samples = _debug_samples(out, rollout_id)
        assert len(samples) == 4
        assert all(s["response_length"] > 0 for s in samples)
        uids += [s["uid"] for s in samples]
    assert len(uids) == len(set(uids))


def test_killed_driver_resumes_from_its_checkpoint_with_the_same_data(workdir: Path) -> None:
    out = workdir / "resume"
    ckpt = workdir / "resume_ckpt"
    argv = driver_argv(workdir, out, rollouts=3) + [
        "--save",
        str(ckpt),
        "--save-interval",
        "1",
        "--load",
        str(ckpt),
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "train", *argv],
        cwd=ROOT,
        env=driver_env(workdir),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    marker = ckpt / "latest_checkpointed_iteration.txt"
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert proc.poll() is None, "driver exited before its first save"
        assert time.monotonic() < deadline, "no checkpoint was written"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = int(marker.read_text().strip())
    manifest = json.loads((out / "logs" / "services.json").read_text())
    deadline = time.monotonic() + 10
    while any(_alive(e["pid"]) for e in manifest.values() if e["pid"]):
        assert time.monotonic() < deadline, "children outlived the killed driver"
        time.sleep(0.1)

    result = run_slime(workdir, "train", argv)
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = [r["rollout_id"] for r in _records(out, "rollout/step") if r["rollout_id"] > saved]
    assert resumed == list(range(saved + 1, 3))
    first = _debug_samples(out, saved + 1)
    expected_groups = {2 * (saved + 1), 2 * (saved + 1) + 1}
    assert {s["group_index"] for s in first} == expected_groups
