"""Helpers for the trainer tests: seed-flag argument namespaces and random rollout batches."""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
from pathlib import Path

from services.core.arguments import parse_args
from trainer.backends.batch import RolloutBatch


def trainer_args(
    model_dir: Path, *extra: str, rollout_batch_size: int = 4, n_samples: int = 2
) -> argparse.Namespace:
    """``parse_args`` of a one-rank CPU torch-backend run on ``model_dir`` plus ``extra`` flags."""
    return parse_args(
        [
            "--train-backend",
            "fsdp",
            "--hf-checkpoint",
            str(model_dir),
            "--rollout-batch-size",
            str(rollout_batch_size),
            "--n-samples-per-prompt",
            str(n_samples),
            "--actor-num-gpus-per-node",
            "1",
            "--num-rollout",
            "4",
            *extra,
        ]
    )


def random_batch(n: int, *, seed: int = 0, vocab: int = 400, prompt=(2, 6), response=(1, 6)) -> RolloutBatch:
    """``n`` samples of random tokens with random rewards and a few masked response tokens."""
    rng = random.Random(seed)
    tokens, lengths, rewards, masks = [], [], [], []
    for _ in range(n):
        p, r = rng.randint(*prompt), rng.randint(*response)
        tokens.append([rng.randrange(vocab) for _ in range(p + r)])
        lengths.append(r)
        rewards.append(rng.choice([0.0, 1.0]) + rng.random() / 10)
        masks.append([0 if (j == 0 and r > 2) else 1 for j in range(r)])
    return RolloutBatch(tokens=tokens, response_lengths=lengths, rewards=rewards, loss_masks=masks)


def grouped_batch(
    groups: int, group_size: int, *, seed: int = 0, vocab: int = 400, prompt=(3, 8), response=(1, 6)
) -> RolloutBatch:
    """``groups`` prompts with ``group_size`` sampled responses each (a GRPO rollout's shape), random rewards."""
    rng = random.Random(seed)
    tokens, lengths, rewards, masks = [], [], [], []
    for _ in range(groups):
        shared = [rng.randrange(vocab) for _ in range(rng.randint(*prompt))]
        for _ in range(group_size):
            r = rng.randint(*response)
            tokens.append(shared + [rng.randrange(vocab) for _ in range(r)])
            lengths.append(r)
            rewards.append(rng.choice([0.0, 1.0]) + rng.random() / 10)
            masks.append([0 if (j == 0 and r > 2) else 1 for j in range(r)])
    return RolloutBatch(tokens=tokens, response_lengths=lengths, rewards=rewards, loss_masks=masks)


ROOT = Path(__file__).resolve().parents[2]


def driver_argv(workdir: Path, out: Path, *, rollouts: int, engines: int = 1) -> list[str]:
    """``slime train`` flags of the end-to-end tests: the tiny model and arithmetic data in ``workdir``, two prompts
    of two samples a rollout, output (and run id) ``out``."""
    return [
        "--train-backend", "fsdp",
        "--hf-checkpoint", str(workdir / "model"),
        "--prompt-data", str(workdir / "train.jsonl"),
        "--input-key", "prompt",
        "--label-key", "label",
        "--rm-type", "math",
        "--rollout-batch-size", "2",
        "--n-samples-per-prompt", "2",
        "--num-rollout", str(rollouts),
        "--rollout-max-response-len", "6",
        "--actor-num-gpus-per-node", "1",
        "--rollout-num-gpus", str(engines),
        "--distributed-backend", "gloo",
        "--lr", "1e-4",
        "--output-dir", str(out),
        "--run-id", out.name,
        "--port", "0",
        "--log-level", "WARNING",
        "--save-debug-rollout-data", str(out / "debug" / "rollout_{rollout_id}.pt"),
    ]  # fmt: skip


def driver_env(workdir: Path, **extra: str) -> dict[str, str]:
    """The environment of a ``slime train`` child: this checkout importable, plugins recording into ``workdir``."""
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "SLIME_TEST_PLUGIN_DIR": str(workdir / "plugins"),
        "OMP_NUM_THREADS": "1",
        **extra,
    }


def run_slime(
    workdir: Path, command: str, argv: list[str], *, timeout: float = 400, **env: str
) -> subprocess.CompletedProcess:
    """``slime COMMAND ARGV`` in a child process with ``driver_env(workdir, **env)``; output captured."""
    return subprocess.run(
        [sys.executable, "-m", "services.cli", command, *argv],
        cwd=ROOT,
        env=driver_env(workdir, **env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
