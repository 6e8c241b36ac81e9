"""One `slime train` run through real services that exercises the driver's network, logging and debug flags:
`--use-distributed-post` (several rollout-worker processes post the generations), `--rollout-external` (an engine
the test runs itself, in embedded mode), TensorBoard and W&B (offline) files read back, and
`--record-memory-history` on CPU (a warning naming the flag, no files)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import httpx
import pytest
import torch

from services.core.net import free_port
from services.core.supervisor import ServiceProcess
from services.core.tiny_model import build_tiny_model
from tests.trainer.helpers import driver_argv, run_slime
from tests.trainer.wandb_records import offline_runs, wandb_records
from trainer.quickstart.task import split_problems, write_jsonl

ROOT = Path(__file__).resolve().parents[2]
PLUGINS = "tests.trainer.driver_plugins"

pytestmark = pytest.mark.slow
# The run logs to both; without them (they are in the dev extra) the driver would stop at its flag check.
pytest.importorskip("tensorboard")
pytest.importorskip("wandb")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("driver_flags")
    build_tiny_model(root / "model", hidden_size=32, num_layers=2, seed=0)
    train, _ = split_problems(9, eval_size=4)
    write_jsonl(train, root / "train.jsonl")
    return root


@pytest.fixture
def external_engine(workdir: Path) -> str:
    port = free_port()
    engine = ServiceProcess(
        "external-engine",
        [sys.executable, "-m", "services.cli", "serve", "rollout-engine"]
        + ["--hf-checkpoint", str(workdir / "model"), "--port", str(port), "--log-level", "WARNING"],
        health_url=f"http://127.0.0.1:{port}/health",
        log_path=workdir / "external-engine.log",
        env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
        cwd=ROOT,
    )
    engine.start()
    try:
        engine.wait_healthy(120)
        yield f"127.0.0.1:{port}"
    finally:
        engine.stop(timeout=10)


def test_distributed_post_external_engine_logging_and_memory_flags(
    workdir: Path, external_engine: str
) -> None:
    out = workdir / "run"
    argv = [
        *driver_argv(workdir, out, rollouts=2),
        "--custom-generate-function-path", f"{PLUGINS}.generate_recording_pid",
        "--use-distributed-post", "--num-gpus-per-node", "2",
        "--rollout-external", "--rollout-external-engine-addrs", external_engine,
        "--use-tensorboard", "--tb-project-name", "unused-with-TENSORBOARD_DIR",
        "--use-wandb", "--wandb-mode", "offline", "--wandb-dir", str(out / "wandb"),
        "--wandb-project", "flags", "--wandb-group", "e2e", "--disable-wandb-random-suffix",
        "--record-memory-history", "--memory-snapshot-dir", str(out / "memory"),
    ]  # fmt: skip
    result = run_slime(
        workdir, "train", argv, timeout=300, TENSORBOARD_DIR=str(out / "tb"), WANDB_SILENT="true"
    )
    assert result.returncode == 0, result.stderr[-3000:]

    # --use-distributed-post: the samples were posted by two rollout-worker processes, not one.
    samples = [
        s
        for rollout_id in (0, 1)
        for s in torch.load(out / "debug" / f"rollout_{rollout_id}.pt", weights_only=False)["samples"]
    ]
    assert len(samples) == 8
    assert len({s["metadata"]["rollout_worker_pid"] for s in samples}) == 2
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["perf/rollout_workers"] == 2

    # --rollout-external: no engine of the stack's own; the external one generated and took every weight push.
    manifest = json.loads((out / "logs" / "services.json").read_text())
    assert not [name for name in manifest if name.startswith("engine-")]
    assert all(s["weight_versions"] == [str(i // 4 + 1)] for i, s in enumerate(samples))
    version = httpx.get(f"http://{external_engine}/get_weight_version", timeout=5).json()
    assert str(version.get("weight_version")) == "3"

    # TensorBoard ($TENSORBOARD_DIR wins over --tb-project-name, as in slime): the scalars read back.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    rewards = events.Scalars("rollout/raw_reward")
    assert [e.step for e in rewards] == [0, 1]
    assert [e.value for e in rewards] == pytest.approx([r["rollout/raw_reward"] for r in logged])
    assert [e.step for e in events.Scalars("train/loss")] == [r["train/step"] for r in logged]

    # W&B offline: one run named after the group, with both rollouts in its history.
    (run_dir,) = offline_runs(out / "wandb")
    records = wandb_records(run_dir)
    assert records.run.display_name == "e2e" and records.run.project == "flags"
    assert [row["rollout/step"] for row in records.history] == [0, 1]
    assert [row["train/step"] for row in records.history] == [r["train/step"] for r in logged]
    assert [row["rollout/raw_reward"] for row in records.history] == pytest.approx(
        [r["rollout/raw_reward"] for r in logged]
    )

    # --record-memory-history on CPU: said so, naming the flag, and nothing written.
    assert "--record-memory-history records CUDA memory snapshots and needs a CUDA GPU" in result.stderr
    assert not (out / "memory").exists() or not any((out / "memory").iterdir())
