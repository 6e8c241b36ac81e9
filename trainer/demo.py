"""``slime demo`` (what ``make demo`` runs): GRPO on the quick-start arithmetic model through the embedded stack.

Redis, two built-in rollout engines, the router, the reward model and the rollout buffer start as child processes;
the trainer runs GRPO with held-out evaluation and writes ``summary.json`` and a reward/accuracy curve to the
output directory. Any ``slime train`` flag given to ``slime demo`` overrides the demo's own setting of it.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

QUICKSTART_DIR = Path(__file__).resolve().parents[1] / "examples" / "quickstart"
DEFAULT_OUTPUT_DIR = Path("outputs") / "demo"
EVAL_NAME = "heldout"
SUMMARY_FILE = "summary.json"
CURVE_FILE = "curve.png"


def demo_flags(quickstart_dir: Path = QUICKSTART_DIR) -> list[str]:
    """The demo's ``slime train`` flags: GRPO on 2 CPU cores, two engines, held-out eval every few rollouts."""
    return [
        "--train-backend", "fsdp",
        "--hf-checkpoint", str(quickstart_dir / "model"),
        "--prompt-data", str(quickstart_dir / "train.jsonl"),
        "--input-key", "prompt",
        "--label-key", "label",
        "--apply-chat-template",
        "--rollout-shuffle",
        "--rm-type", "math",
        # An answer cut at --rollout-max-response-len (it never ended its turn) scores 0: see trainer/quickstart/reward.py.
        "--custom-reward-post-process-path", "trainer.quickstart.reward.truncated_answers_score_zero",
        "--advantage-estimator", "grpo",
        "--num-rollout", "50",
        "--rollout-batch-size", "16",
        "--n-samples-per-prompt", "8",
        # The longest answer, "\boxed{198}" and the end-of-turn token, is 7 tokens.
        "--rollout-max-response-len", "8",
        "--rollout-temperature", "1.0",
        # The whole rollout in one packed micro-batch (the same loss as smaller ones: gradients are accumulated
        # over a step's micro-batches anyway): a small model's step costs per operation, not per token.
        "--micro-batch-size", "128",
        # The KL loss to the warm start keeps the policy near the model the held-out problems were measured on.
        "--use-kl-loss",
        "--kl-loss-coef", "0.05",
        "--kl-loss-type", "low_var_kl",
        # Cosine decay to a tenth: the held-out score settles instead of swinging by several points at the end.
        "--lr", "1e-3",
        "--lr-decay-style", "cosine",
        "--min-lr", "1e-4",
        "--weight-decay", "0.0",
        "--eval-prompt-data", EVAL_NAME, str(quickstart_dir / "eval.jsonl"),
        "--eval-interval", "5",
        # Four answers per held-out problem: 800 graded answers per evaluation, so the accuracy's standard error
        # is under 2 points.
        "--n-samples-per-eval-prompt", "4",
        "--actor-num-gpus-per-node", "1",
        "--rollout-num-gpus", "2",
        "--distributed-backend", "gloo",
        "--run-id", "demo",
        "--output-dir", str(DEFAULT_OUTPUT_DIR),
        "--port", "0",
    ]  # fmt: skip


@dataclass
class DemoSummary:
    """What ``summary.json`` holds: held-out accuracy (0-1) before and after, and how the run went."""

    accuracy_before: float
    accuracy_after: float
    rollouts: int
    wall_seconds: float
    startup_seconds: float
    tokens_per_second: float
    reward_first: float
    reward_last: float
    weight_syncs: int
    weight_sync_seconds_mean: float
    eval_curve: list[tuple[int, float]]
    reward_curve: list[tuple[int, float]]
    model: str
    output_dir: str
    command: str
    services: dict[str, str] = field(default_factory=dict)


def _eval_curve(metrics_path: Path, key: str) -> list[tuple[int, float]]:
    """(rollouts trained, held-out accuracy) of every evaluation this run logged, in order."""
    curve = []
    for line in metrics_path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if "eval/step" in record and key in record:
            curve.append((int(record["eval/step"]), float(record[key])))
    return curve


def summarize(
    history: list[dict[str, Any]],
    eval_curve: list[tuple[int, float]],
    *,
    wall_seconds: float,
    startup_seconds: float,
    model: str,
    output_dir: Path,
    command: str,
    services: dict[str, str],
) -> DemoSummary:
    if not history:
        raise ValueError("the run trained no rollout: nothing to summarize")
    if not eval_curve:
        raise ValueError(f"the run logged no held-out evaluation (eval/{EVAL_NAME}): nothing to compare")
    rewards = [(int(r["rollout_id"]), float(r["rollout/raw_reward"])) for r in history]
    rollout_seconds = [float(r["perf/rollout_time"]) for r in history]
    tokens = [float(r["perf/tokens_per_second"]) * s for r, s in zip(history, rollout_seconds, strict=True)]
    syncs = [float(r["perf/weight_sync_seconds"]) for r in history if "perf/weight_sync_seconds" in r]
    return DemoSummary(
        accuracy_before=eval_curve[0][1],
        accuracy_after=eval_curve[-1][1],
        rollouts=len(history),
        wall_seconds=round(wall_seconds, 1),
        startup_seconds=round(startup_seconds, 1),
        tokens_per_second=round(sum(tokens) / max(sum(rollout_seconds), 1e-9), 1),
        reward_first=rewards[0][1],
        reward_last=rewards[-1][1],
        weight_syncs=len(syncs),
        weight_sync_seconds_mean=round(statistics.fmean(syncs), 3) if syncs else 0.0,
        eval_curve=eval_curve,
        reward_curve=rewards,
        model=model,
        output_dir=str(output_dir),
        command=command,
        services=services,
    )


def plot_curve(summary: DemoSummary, path: Path) -> Path:
    """Reward mean per rollout and held-out accuracy at each evaluation, on one axis (both are in [0, 1])."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.plot(
        [r + 1 for r, _ in summary.reward_curve],
        [v for _, v in summary.reward_curve],
        color="tab:blue",
        alpha=0.7,
        label="training reward (mean per rollout)",
    )
    ax.plot(
        [r for r, _ in summary.eval_curve],
        [v for _, v in summary.eval_curve],
        color="tab:red",
        marker="o",
        label="held-out accuracy",
    )
    ax.set_xlabel("rollouts trained")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    ax.set_title(
        f"slime demo: held-out accuracy {summary.accuracy_before:.0%} → {summary.accuracy_after:.0%} "
        f"in {summary.wall_seconds:.0f} s"
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _clear_previous(out_dir: Path) -> None:
    """A demo directory holds one run: an old metrics file would be appended to and old Redis data replayed."""
    for name in ("metrics.jsonl", SUMMARY_FILE, CURVE_FILE):
        (out_dir / name).unlink(missing_ok=True)
    if (out_dir / "logs").is_dir():
        shutil.rmtree(out_dir / "logs")


def _quiet_children() -> None:
    """Keep the terminal to the demo's own lines: no network, no per-process progress bars or gRPC fork notes."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    # No OMP_NUM_THREADS: the stack gives each engine its share of the cores (--num-threads), and the trainer of a
    # synchronous run trains while the engines wait, on every core.


def _check_ready(args: Any) -> None:
    model = Path(args.hf_checkpoint)
    if not (model / "config.json").exists():
        raise SystemExit(
            f"slime demo: error: no model at --hf-checkpoint {model}; rebuild the quick-start model with "
            "`python -m trainer.quickstart.build_model`"
        )
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise SystemExit(
            "slime demo: error: the demo draws its curve with matplotlib: pip install matplotlib"
        ) from exc


def main(argv: Sequence[str] | None = None) -> int:
    from services.core.arguments import parse_args
    from services.core.logging_setup import setup_logging

    user_flags = list(sys.argv[1:] if argv is None else argv)
    start = time.perf_counter()
    args = parse_args([*demo_flags(), *user_flags], prog="slime demo")
    setup_logging(args.log_level, service="demo")
    # Each weight push has its own log line; the per-rollout status line already reports its time.
    logging.getLogger("trainer.backends.torch_backend.trainer").setLevel(logging.WARNING)
    _check_ready(args)
    _quiet_children()
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _clear_previous(out_dir)
    logger.info(
        "slime demo: GRPO on %s, %d rollouts of %d prompts x %d samples, held-out eval every %d; output in %s",
        args.hf_checkpoint,
        args.num_rollout,
        args.rollout_batch_size,
        args.n_samples_per_prompt,
        args.eval_interval,
        out_dir.resolve(),
    )
    from trainer.run import RLRun

    with RLRun(args, mode="sync") as run:
        services = run.addresses.metrics_urls() if run.addresses else {}
        services["trainer"] = f"http://{args.host}:{run.status.port}/metrics"
        startup_seconds = time.perf_counter() - start
        history = run.run()
    summary = summarize(
        history,
        _eval_curve(out_dir / "metrics.jsonl", f"eval/{EVAL_NAME}"),
        wall_seconds=time.perf_counter() - start,
        startup_seconds=startup_seconds,
        model=args.hf_checkpoint,
        output_dir=out_dir.resolve(),
        command=shlex.join(["slime", "demo", *user_flags]),
        services=services,
    )
    (out_dir / SUMMARY_FILE).write_text(json.dumps(asdict(summary), indent=2) + "\n", encoding="utf-8")
    plot_curve(summary, out_dir / CURVE_FILE)
    logger.info(
        "held-out accuracy %.1f%% -> %.1f%% after %d rollouts in %.0f s (%.0f tokens/s, %d weight syncs)",
        100 * summary.accuracy_before,
        100 * summary.accuracy_after,
        summary.rollouts,
        summary.wall_seconds,
        summary.tokens_per_second,
        summary.weight_syncs,
    )
    logger.info("summary: %s", out_dir.resolve() / SUMMARY_FILE)
    logger.info("curve:   %s", out_dir.resolve() / CURVE_FILE)
    return 0
