"""The run's metric sinks for real: TensorBoard event files read back with tensorboard's EventAccumulator, and W&B
runs in offline mode read back from the run log they write."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.core.arguments import parse_args
from trainer.metrics_log import MetricsLogger

BASE = [
    "--train-backend",
    "fsdp",
    "--rollout-batch-size",
    "2",
    "--n-samples-per-prompt",
    "2",
    "--num-rollout",
    "2",
]


def _args(*flags: str):
    return parse_args([*BASE, "--global-batch-size", "2", *flags])


def _log_run(logger: MetricsLogger) -> None:
    for rollout_id in (0, 1):
        logger.log(
            {
                "rollout_id": rollout_id,
                "rollout/raw_reward": 0.25 * (rollout_id + 1),
                "train/loss": 1.0 - rollout_id,
            },
            step_key="rollout/step",
            step=rollout_id,
        )
    logger.log({"eval/arith": 0.5}, step_key="eval/step", step=2)
    logger.log({"rollout_id": 2, "eval/arith": 0.5}, step_key="rollout/step", step=2)
    logger.close()


def test_tensorboard_scalars_read_back_under_project_and_experiment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TENSORBOARD_DIR", raising=False)
    args = _args("--use-tensorboard", "--tb-project-name", "proj", "--tb-experiment-name", "exp")
    _log_run(MetricsLogger(args, tmp_path / "out"))

    events = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard_log" / "proj" / "exp"))
    events.Reload()
    rewards = events.Scalars("rollout/raw_reward")
    assert [(e.step, e.value) for e in rewards] == [(0, 0.25), (1, 0.5)]
    # train/* sit at the train step: 2 optimizer steps per rollout (2 prompts x 2 samples, global batch 2).
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(0, 1.0), (2, 0.0)]
    # An eval metric repeated in the rollout record is written once, at its eval step.
    assert [(e.step, e.value) for e in events.Scalars("eval/arith")] == [(2, 0.5)]
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("train/step") for r in records] == [0, 2, None, None]


def test_tensorboard_dir_env_wins_and_a_missing_project_names_the_flag(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    monkeypatch.delenv("TENSORBOARD_DIR", raising=False)
    with pytest.raises(ValueError, match="--tb-project-name"):
        MetricsLogger(_args("--use-tensorboard"), tmp_path / "none")

    monkeypatch.setenv("TENSORBOARD_DIR", str(tmp_path / "tb"))
    _log_run(MetricsLogger(_args("--use-tensorboard"), tmp_path / "out"))
    events = event_accumulator.EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert "rollout/raw_reward" in events.Tags()["scalars"]


def test_wandb_offline_run_from_the_environment_with_every_flag(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("wandb")
    from tests.trainer.wandb_records import offline_runs, wandb_records

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    args = _args(
        "--use-wandb",
        "--wandb-project", "slime-tests",
        "--wandb-team", "team",
        "--wandb-group", "grpo",
        "--wandb-dir", str(tmp_path / "wb" / "nested"),
        # Offline: neither the key nor the host may be contacted (the host is a closed port).
        "--wandb-key", "0" * 40,
        "--wandb-host", "http://127.0.0.1:9",
    )  # fmt: skip
    logger = MetricsLogger(args, tmp_path / "out")
    run_id = args.wandb_run_id
    _log_run(logger)

    (run_dir,) = offline_runs(tmp_path / "wb" / "nested")
    assert run_dir.name.endswith(f"-{run_id}")
    records = wandb_records(run_dir)
    assert records.run.project == "slime-tests" and records.run.run_group == "grpo"
    # The random suffix (on by default) goes on the run name: group_<8-character id>.
    assert records.run.display_name.startswith("grpo_") and len(records.run.display_name) == len("grpo_") + 8
    assert records.config["rollout_batch_size"] == 2
    rows = [r for r in records.history if "rollout/raw_reward" in r]
    assert [(r["rollout/step"], r["rollout/raw_reward"], r["train/step"]) for r in rows] == [
        (0, 0.25, 0),
        (1, 0.5, 2),
    ]
    assert any(r.get("eval/step") == 2 and r.get("eval/arith") == 0.5 for r in records.history)


def test_wandb_run_id_resumes_the_run_and_always_use_train_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("wandb")
    from tests.trainer.wandb_records import offline_runs, wandb_records

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    flags = [
        "--use-wandb",
        "--wandb-mode", "offline",
        "--wandb-dir", str(tmp_path / "wb"),
        "--wandb-group", "resumed",
        "--disable-wandb-random-suffix",
        "--wandb-run-id", "slimerun01",
        "--wandb-always-use-train-step",
    ]  # fmt: skip
    for rollout_id in (0, 1):  # two processes, e.g. a run and its restart with --load
        logger = MetricsLogger(_args(*flags), tmp_path / "out")
        logger.log({"rollout/raw_reward": float(rollout_id)}, step_key="rollout/step", step=rollout_id)
        logger.close()

    runs = offline_runs(tmp_path / "wb")
    # One directory per process (a "-1" suffix when both start in the same second), one run id in both.
    assert len(runs) == 2 and all((r / "run-slimerun01.wandb").exists() for r in runs)
    steps = []
    for run_dir in runs:
        records = wandb_records(run_dir)
        assert records.run.run_id == "slimerun01" and records.run.display_name == "resumed"
        steps += [r["rollout/step"] for r in records.history]
    # --wandb-always-use-train-step: the rollout step is the train step, rollout_id x 2 x 2 / 2.
    assert steps == [0, 2]
