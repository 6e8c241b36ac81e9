"""Helpers for the trainer tests: seed-flag argument namespaces and random rollout batches."""

from __future__ import annotations

import argparse
import random
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
