"""``slime demo``, shortened to a few rollouts: every service starts as its own process, weights reach the
engines, ``summary.json`` and the curve are written, and no process of the run outlives it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from services.core.arguments import parse_args
from trainer.demo import EVAL_NAME, demo_flags

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
TAG_VARIABLE = "SLIME_DEMO_TEST_TAG"
SERVICES = ("rollout-engine", "router", "reward-model", "rollout-buffer")


def _command_line(pid: int) -> str | None:
    """The command line of a live (non-zombie) process, or None."""
    proc = Path("/proc") / str(pid)
    try:
        if "State:\tZ" in (proc / "status").read_text():
            return None
        return (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except (FileNotFoundError, ProcessLookupError):
        return None


def _tagged_processes(tag: str) -> dict[int, str]:
    """Live processes whose environment carries ``tag``: the demo and everything it started (except redis-server,
    which writes its title over its environment; ``services.json`` names its pid)."""
    found: dict[int, str] = {}
    needle = f"{TAG_VARIABLE}={tag}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle not in (entry / "environ").read_bytes().split(b"\0"):
                continue
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        command = _command_line(int(entry.name))
        if command is not None:
            found[int(entry.name)] = command
    return found


@pytest.mark.slow
def test_short_demo_runs_every_service_and_leaves_no_process(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    log_path = tmp_path / "demo.log"
    tag = uuid.uuid4().hex
    argv = [
        "--num-rollout", "2",
        "--rollout-batch-size", "4",
        "--n-samples-per-prompt", "4",
        "--eval-interval", "1",
        "--eval-prompt-data", EVAL_NAME, f"{EXAMPLES / 'quickstart' / 'eval.jsonl'}@[0:16]",
        "--output-dir", str(out),
    ]  # fmt: skip
    env = {**os.environ, TAG_VARIABLE: tag, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    seen: dict[int, str] = {}
    manifest_path = out / "logs" / "services.json"
    started: dict[str, str | None] = {}
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "demo", *argv],
            cwd=tmp_path,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 240
        try:
            while proc.poll() is None:
                assert time.monotonic() < deadline, "the short demo did not finish in 240 s"
                seen.update(_tagged_processes(tag))
                if manifest_path.exists() and not started:
                    manifest = json.loads(manifest_path.read_text())
                    started = {name: _command_line(entry["pid"]) for name, entry in manifest.items()}
                time.sleep(0.2)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    output = log_path.read_text()
    assert proc.returncode == 0, output[-4000:]

    commands = [seen[pid] for pid in sorted(seen) if pid != proc.pid]
    for service in SERVICES:
        assert any(f"serve {service}" in c for c in commands), f"no {service} process was started"
    assert sum("serve rollout-engine" in c for c in commands) >= 2
    assert "redis-server" in (started.get("redis") or "")
    for name in ("engine-0", "engine-1", "router", "reward-model", "rollout-buffer"):
        assert started.get(name) in commands, f"{name} of services.json was not a live process of the run"

    summary = json.loads((out / "summary.json").read_text())
    assert summary["rollouts"] == 2
    assert 0.0 <= summary["accuracy_before"] <= 1.0
    assert 0.0 <= summary["accuracy_after"] <= 1.0
    assert [step for step, _ in summary["eval_curve"]] == [0, 1, 2]
    assert summary["weight_syncs"] >= 1
    assert summary["wall_seconds"] > 0
    assert summary["tokens_per_second"] > 0
    assert {"router", "reward-model", "rollout-buffer", "engine-0", "engine-1", "trainer"} <= set(
        summary["services"]
    )
    for name, url in summary["services"].items():
        assert url.endswith("/metrics"), name
        assert url in output, f"the {name} metrics address was not printed"
    png = (out / "curve.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000

    # Everything the run started (engines, services, Redis, trainer ranks) is gone once the demo returns.
    leftovers = _tagged_processes(tag)
    assert not leftovers, f"processes outlived the demo: {leftovers}"
    manifest = json.loads(manifest_path.read_text())
    assert all(_command_line(entry["pid"]) is None for entry in manifest.values()), manifest


def test_user_flags_override_the_demo_defaults(tmp_path: Path) -> None:
    args = parse_args([*demo_flags(), "--num-rollout", "3", "--lr", "5e-4", "--output-dir", str(tmp_path)])
    assert args.num_rollout == 3
    assert args.lr == 5e-4
    assert args.output_dir == str(tmp_path)
    assert args.rollout_num_gpus == 2
    assert args.eval_prompt_data[0] == EVAL_NAME


def test_demo_without_the_quickstart_model_names_the_rebuild_command(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "services.cli",
            "demo",
            "--hf-checkpoint",
            str(tmp_path / "missing"),
            "--output-dir",
            str(tmp_path / "out"),
        ],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "--hf-checkpoint" in result.stderr
    assert "trainer.quickstart.build_model" in result.stderr


@pytest.mark.parametrize("path", sorted((EXAMPLES / "gpu").glob("*.args")), ids=lambda p: p.name)
def test_gpu_examples_parse_as_slime_arguments(path: Path) -> None:
    args = parse_args([f"@{path}"])
    assert args.engine_backend == "sglang"
    assert args.train_backend == "fsdp"
    assert args.advantage_estimator == "grpo"
    if "colocated" in path.name:
        assert args.colocate
        assert args.rollout_num_gpus == args.actor_num_gpus_per_node
    else:
        assert not args.colocate
        assert args.rollout_num_gpus >= args.rollout_num_gpus_per_engine
