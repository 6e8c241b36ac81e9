"""Demo vs TRL: the quick-start GRPO run with TRL's ``GRPOTrainer`` on CPU and with ``slime train`` (the embedded
stack: Redis, two engines, router, reward model, rollout buffer), same settings, in one invocation.

    python bench/bench_trl.py [--steps 20] [--prompts-per-step 16] [--group-size 8]

Both start from ``examples/quickstart/model`` and train on ``examples/quickstart/train.jsonl`` with the same group
size, prompts per step, response length, temperature, learning rate, loss (GRPO, sequence-mean, a KL loss to the
starting model with coefficient ``--kl-coef``: TRL's ``beta`` with its k3 estimator, slime's ``--kl-loss-coef``
with ``low_var_kl``, the same estimator clipped) and number of steps; an answer that never ends its turn scores 0
for both (the demo's reward post-processing). Seconds per RL step are measured the same way for all: from the end
of the first step to the end of the last, divided by the steps in between (start-up, the first step's warm-up and
the final evaluation excluded). Held-out accuracy is measured for every final model by one evaluator
(``trainer.quickstart.evaluate``: the ``math`` grader on ``eval.jsonl``, sampled at the rollout temperature, four
answers per problem). ``slime train-async`` (the next rollout generated while the trainer trains, with
``--use-tis``) runs as a third entry.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.core.supervisor import usable_cpus  # noqa: E402
from trainer.quickstart.task import QUICKSTART as TASK  # noqa: E402
from trainer.quickstart.task import Problem  # noqa: E402

QUICKSTART_DIR = ROOT / "examples" / "quickstart"
logger = logging.getLogger("bench_trl")
# Held-out accuracy is the mean over four sampled answers per problem (800 graded answers).
EVAL_SEEDS = range(4)


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values)


@dataclass(frozen=True)
class Settings:
    steps: int
    prompts_per_step: int
    group_size: int
    max_response_len: int
    temperature: float
    lr: float
    seed: int
    kl_coef: float
    quickstart_dir: Path
    # Rollout engines of the embedded stack (the demo's two unless --engines says otherwise).
    engines: int = 2


@dataclass
class Result:
    name: str
    seconds_per_step: float
    total_seconds: float
    accuracy_after: float
    # slime's own breakdown of a step (medians over the steps after the first, from metrics.jsonl): generating and
    # scoring the rollout, training on it, pushing the weights to the engines.
    rollout_seconds: float | None = None
    train_seconds: float | None = None
    weight_sync_seconds: float | None = None


def _per_step(stamps: list[float]) -> float:
    if len(stamps) < 2:
        raise ValueError("seconds per step needs at least 2 steps")
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1)


def run_trl(settings: Settings, work: Path, held_out: list[Problem]) -> Result:
    """TRL's ``GRPOTrainer`` on CPU: generation with ``model.generate``, the reward in-process."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from services.reward_model.graders.math import grade_math
    from trainer.quickstart.evaluate import accuracy

    rows = [json.loads(line) for line in (settings.quickstart_dir / "train.jsonl").read_text().splitlines()]
    dataset = Dataset.from_list(
        [{"prompt": [{"role": "user", "content": r["prompt"]}], "label": r["label"]} for r in rows]
    )

    stop_ids: set[int] = set()

    def math_reward(
        completions: list, label: list[str], completion_ids: list[list[int]], **_: object
    ) -> list[float]:
        # As the demo's reward post-processing does for slime: an answer that never ends its turn scores 0.
        return [
            float(grade_math(c[0]["content"], y)) if stop_ids & set(ids) else 0.0
            for c, y, ids in zip(completions, label, completion_ids, strict=True)
        ]

    stamps: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001 - transformers' signature
            stamps.append(time.perf_counter())

    config = GRPOConfig(
        output_dir=str(work / "trl"),
        use_cpu=True,
        # float32 like slime's run, and TRL's faster setting on both hosts measured: its default (bf16 autocast)
        # emulates bfloat16 matrix products on CPUs without native support (an AVX2 host: ~15x slower steps), and
        # on a CPU with AMX its attention backward in bf16 costs more than the matrix products save (0.48 s per
        # step against 0.40-0.45 s).
        bf16=False,
        per_device_train_batch_size=settings.prompts_per_step * settings.group_size,
        num_generations=settings.group_size,
        max_completion_length=settings.max_response_len,
        temperature=settings.temperature,
        top_k=0,
        top_p=1.0,
        learning_rate=settings.lr,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        warmup_steps=0,
        max_grad_norm=1.0,
        beta=settings.kl_coef,
        loss_type="grpo",
        scale_rewards="group",
        num_iterations=1,
        max_steps=settings.steps,
        disable_dropout=True,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=settings.seed,
        dataloader_num_workers=0,
    )
    tokenizer = AutoTokenizer.from_pretrained(settings.quickstart_dir / "model")
    model = AutoModelForCausalLM.from_pretrained(settings.quickstart_dir / "model", dtype=torch.float32)
    eos = model.generation_config.eos_token_id
    stop_ids.update(eos if isinstance(eos, list) else [eos])
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=math_reward,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[StepClock()],
    )
    start = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - start
    score = _mean(
        accuracy(
            trainer.model,
            tokenizer,
            held_out,
            temperature=settings.temperature,
            max_new_tokens=settings.max_response_len,
            seed=seed,
        )
        for seed in EVAL_SEEDS
    )
    return Result("TRL GRPOTrainer (CPU)", _per_step(stamps), total, score)


def run_slime(settings: Settings, work: Path, held_out: list[Problem], *, command: str = "train") -> Result:
    """``slime train`` (or ``train-async``: the next rollout generated while the trainer trains, one step
    off-policy) on the embedded stack with the demo's flags and the benchmark's settings."""
    from trainer.demo import demo_flags
    from trainer.quickstart.evaluate import accuracy_of_dir

    out = work / f"slime-{command}"
    export = work / f"slime-{command}-model"
    flags = [
        *demo_flags(settings.quickstart_dir),
        "--num-rollout", str(settings.steps),
        "--rollout-batch-size", str(settings.prompts_per_step),
        "--n-samples-per-prompt", str(settings.group_size),
        "--rollout-max-response-len", str(settings.max_response_len),
        "--rollout-temperature", str(settings.temperature),
        "--lr", str(settings.lr),
        "--lr-decay-style", "constant",  # the same schedule as TRL's lr_scheduler_type
        "--kl-loss-coef", str(settings.kl_coef),
        "--seed", str(settings.seed),
        "--rollout-num-gpus", str(settings.engines),
        "--eval-interval", "0",
        "--output-dir", str(out),
        "--run-id", "bench-trl",
        "--save-hf", str(export),
        "--log-level", "WARNING",
        # One step off-policy: truncated importance sampling against the rollout's own log-probs, as slime
        # recommends for asynchronous training.
        *(["--use-tis"] if command == "train-async" else []),
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    if command == "train-async":
        # The trainer trains while the engines generate: half the cores for it (one of two), the rest for the
        # engines. `slime train` trains while they wait, on every core (as TRL does, in one process).
        env["OMP_NUM_THREADS"] = str(max(1, usable_cpus() // 2))
    else:
        env.pop("OMP_NUM_THREADS", None)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "services.cli", command, *flags], cwd=ROOT, env=env, check=True)
    total = time.perf_counter() - start
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    stamps = [r["time"] for r in records if "rollout/step" in r]
    score = _mean(
        accuracy_of_dir(
            str(export),
            held_out,
            temperature=settings.temperature,
            max_new_tokens=settings.max_response_len,
            seed=seed,
        )
        for seed in EVAL_SEEDS
    )

    def median_of(key: str) -> float | None:
        values = sorted(r[key] for r in records[1:] if key in r)
        return values[len(values) // 2] if values else None

    return Result(
        f"slime {command} (embedded stack)",
        _per_step(stamps),
        total,
        score,
        rollout_seconds=median_of("perf/rollout_time"),
        train_seconds=median_of("perf/train_time"),
        weight_sync_seconds=median_of("perf/weight_sync_seconds"),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--prompts-per-step", type=int, default=16)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--max-response-len", type=int, default=8)
    parser.add_argument("--kl-coef", type=float, default=0.05)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quickstart-dir", type=Path, default=QUICKSTART_DIR, help="Model and data to use.")
    parser.add_argument(
        "--engines", type=int, default=2, help="Rollout engines of slime's embedded stack (the demo runs 2)."
    )
    parser.add_argument("--json", type=Path, default=None, help="Also write the results here.")
    opts = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings(
        steps=opts.steps,
        prompts_per_step=opts.prompts_per_step,
        group_size=opts.group_size,
        max_response_len=opts.max_response_len,
        temperature=opts.temperature,
        lr=opts.lr,
        seed=opts.seed,
        kl_coef=opts.kl_coef,
        quickstart_dir=opts.quickstart_dir,
        engines=opts.engines,
    )
    # eval.jsonl is written from this split (tests/trainer/test_quickstart.py checks it).
    held_out = TASK.split()[1]
    from trainer.quickstart.evaluate import accuracy_of_dir

    before = _mean(
        accuracy_of_dir(
            str(settings.quickstart_dir / "model"),
            held_out,
            temperature=settings.temperature,
            max_new_tokens=settings.max_response_len,
            seed=seed,
        )
        for seed in EVAL_SEEDS
    )
    with tempfile.TemporaryDirectory(prefix="bench-trl-") as tmp:
        work = Path(tmp)
        trl_result = run_trl(settings, work, held_out)
        slime_result = run_slime(settings, work, held_out)
        async_result = run_slime(settings, work, held_out, command="train-async")
    import trl

    rows = [
        f"{'':32} {'s/step':>8} {'total s':>8} {'held-out acc':>13}",
        f"{'warm start (before)':32} {'':>8} {'':>8} {before:>13.1%}",
    ]
    for result in (trl_result, slime_result, async_result):
        rows.append(
            f"{result.name:32} {result.seconds_per_step:>8.2f} {result.total_seconds:>8.1f} "
            f"{result.accuracy_after:>13.1%}"
        )
    for result in (slime_result, async_result):
        parts = (
            ("rollout", result.rollout_seconds),
            ("train", result.train_seconds),
            ("weight push", result.weight_sync_seconds),
        )
        rows.append(
            f"{result.name}, median per step: "
            + ", ".join(f"{n} {v:.3f} s" for n, v in parts if v is not None)
        )
    ratio = trl_result.seconds_per_step / slime_result.seconds_per_step
    async_ratio = trl_result.seconds_per_step / async_result.seconds_per_step
    for name, value in (("slime train", ratio), ("slime train-async", async_ratio)):
        rows.append(
            f"{name}: {value:.2f}x TRL {trl.__version__}'s speed per RL step "
            f"({'faster' if value >= 1 else 'slower'})"
        )
    sys.stdout.write("\n".join(rows) + "\n")
    if opts.json:
        opts.json.write_text(
            json.dumps(
                {
                    "settings": asdict(settings),
                    "accuracy_before": before,
                    "results": [asdict(trl_result), asdict(slime_result), asdict(async_result)],
                    "speedup": ratio,
                    "speedup_async": async_ratio,
                    "trl_version": trl.__version__,
                },
                indent=2,
                default=str,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
