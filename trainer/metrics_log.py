"""Where a run's metrics go: always a JSON-lines file, and TensorBoard and W&B when their flags ask for them.

Also the rollout-statistics helpers slime logs (pass@k, reward categories, zero-std groups), as pure functions.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import string
import time
from collections import Counter
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k estimator: 1 - C(n-c, k) / C(n, k) for ``c`` correct answers among ``n`` samples."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per prompt, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def passrate_metrics(rewards_per_prompt: list[list[float]], prefix: str) -> dict[str, float]:
    """pass@k for k = 1, 2, 4, … ≤ samples per prompt; a sample is correct when its reward is 1, as in slime."""
    if not rewards_per_prompt:
        return {}
    n = min(len(r) for r in rewards_per_prompt)
    metrics = {}
    k = 1
    while k <= n:
        values = [pass_at_k(len(r), sum(1 for x in r if x == 1), k) for r in rewards_per_prompt]
        metrics[f"{prefix}pass@{k}"] = sum(values) / len(values)
        k *= 2
    return metrics


def reward_category_metrics(rewards: list[Any], key: str, prefix: str) -> dict[str, float]:
    """Share of samples per value of ``reward[key]`` (``--log-reward-category``)."""
    counts = Counter(str(r.get(key)) if isinstance(r, dict) else "none" for r in rewards)
    total = sum(counts.values()) or 1
    return {f"{prefix}error_cat/{cat}": n / total for cat, n in counts.items()}


def zero_std_metrics(group_rewards: list[list[float]], prefix: str = "rollout/") -> dict[str, float]:
    """Groups whose samples all got the same reward, counted per reward value (no GRPO signal in them)."""
    counts: Counter[str] = Counter()
    for rewards in group_rewards:
        if rewards and max(rewards) == min(rewards):
            counts[f"{round(float(rewards[0]), 1)}"] += 1
    return {f"{prefix}zero_std/count_{value}": float(n) for value, n in counts.items()}


def _random_suffix(length: int = 8) -> str:
    """A W&B-style run id (lowercase letters and digits); wandb's own helper moved between releases."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(length))


class MetricsLogger:
    """Fan a run's metrics out to ``metrics.jsonl`` and, if enabled, TensorBoard and W&B."""

    def __init__(self, args: Any, output_dir: str | Path):
        self.args = args
        self.path = Path(output_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")
        self._tb = self._open_tensorboard(args) if getattr(args, "use_tensorboard", False) else None
        self._wandb = self._open_wandb(args) if getattr(args, "use_wandb", False) else None

    @staticmethod
    def _open_tensorboard(args: Any) -> Any:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise RuntimeError(
                "--use-tensorboard needs the tensorboard package: pip install 'slime-rl[tensorboard]'"
            ) from exc
        directory = os.environ.get("TENSORBOARD_DIR")
        if directory is None:
            if not args.tb_project_name:
                raise ValueError(
                    "--use-tensorboard needs --tb-project-name or the TENSORBOARD_DIR environment variable"
                )
            experiment = args.tb_experiment_name or time.strftime("%Y%m%d-%H%M%S")
            directory = os.path.join("tensorboard_log", args.tb_project_name, experiment)
        logger.info("TensorBoard logs in %s", directory)
        return SummaryWriter(log_dir=directory)

    @staticmethod
    def _open_wandb(args: Any) -> Any:
        try:
            import wandb
        except ImportError as exc:
            raise RuntimeError("--use-wandb needs the wandb package: pip install 'slime-rl[wandb]'") from exc
        # --wandb-mode wins over WANDB_MODE, as in slime; offline and disabled runs never reach the server.
        offline = (args.wandb_mode or os.environ.get("WANDB_MODE")) in ("offline", "disabled")
        if args.wandb_key and not offline:
            wandb.login(key=args.wandb_key, host=args.wandb_host, relogin=True)
        if args.wandb_dir:
            Path(args.wandb_dir).mkdir(parents=True, exist_ok=True)
        name = args.wandb_group
        if name and getattr(args, "wandb_random_suffix", True):
            name = f"{name}_{_random_suffix()}"
        run = wandb.init(
            project=args.wandb_project,
            entity=args.wandb_team,
            group=args.wandb_group,
            name=name,
            dir=args.wandb_dir,
            mode=args.wandb_mode,
            id=args.wandb_run_id,
            resume="allow" if args.wandb_run_id else None,
            settings=wandb.Settings(base_url=args.wandb_host) if args.wandb_host else None,
            config={
                k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))
            },
        )
        logger.info("W&B run %s in %s (resume it with --wandb-run-id %s)", run.id, run.dir, run.id)
        args.wandb_run_id = run.id
        for step_key in ("train/step", "rollout/step", "eval/step"):
            run.define_metric(step_key)
        for family, step_key in (
            ("train/*", "train/step"),
            ("rollout/*", "rollout/step"),
            ("eval/*", "eval/step"),
            ("perf/*", "rollout/step"),
            ("passrate/*", "rollout/step"),
            ("multi_turn/*", "rollout/step"),
        ):
            run.define_metric(family, step_metric=step_key)
        return run

    def _train_steps(self, rollout_id: int) -> int:
        """Optimizer steps taken before rollout ``rollout_id`` (slime's train step at the rollout's start)."""
        args = self.args
        return rollout_id * args.rollout_batch_size * args.n_samples_per_prompt // args.global_batch_size

    def log(self, metrics: dict[str, Any], *, step_key: str, step: int) -> None:
        """One record: ``step_key`` (``rollout/step`` or ``eval/step``) is the rollout id, or the train step
        with ``--wandb-always-use-train-step``; a record with ``train/*`` metrics also carries ``train/step``."""
        steps = {step_key: self._train_steps(step) if self.args.wandb_always_use_train_step else step}
        if any(name.startswith("train/") for name in metrics):
            steps["train/step"] = self._train_steps(step)
        record = {"time": time.time(), **steps, **metrics}
        self._file.write(json.dumps(record, default=float) + "\n")
        self._file.flush()
        if self._tb is not None:
            for name, value in metrics.items():
                # Eval metrics repeated in a rollout record were already written at their eval step.
                if not isinstance(value, (int, float)) or (
                    name.startswith("eval/") and step_key != "eval/step"
                ):
                    continue
                family_step = steps["train/step"] if name.startswith("train/") else steps[step_key]
                self._tb.add_scalar(name, value, family_step)
        if self._wandb is not None:
            self._wandb.log({**steps, **metrics})

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
