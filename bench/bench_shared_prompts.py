"""Shared prompts in the torch backend: one GRPO training step (reference pass, forward, backward, AdamW) with each
group's prompt packed once (the default) against whole-sample packing (``--disable-prompt-sharing``, the baseline),
in one process, alternating, on the quick-start model.

    python bench/bench_shared_prompts.py [--steps 8] [--prompts 16] [--group-size 8] [--threads 1]

The rollout has the quick-start task's shape: ``--prompts`` prompts of 23-26 tokens, ``--group-size`` answers of
5-8 tokens each, micro-batches of 32 samples, the KL loss to the reference model. Prints the CPU seconds per step
(the median and the best after one warm-up step each) and the ratio.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    opts = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(opts.threads))

    import torch

    torch.set_num_threads(opts.threads)
    from services.core.arguments import parse_args
    from trainer.backends.batch import RolloutBatch
    from trainer.backends.torch_backend import TorchTrainer

    model = ROOT / "examples" / "quickstart" / "model"
    samples = opts.prompts * opts.group_size

    def rollout(seed: int) -> RolloutBatch:
        rng = random.Random(seed)
        tokens, responses, rewards = [], [], []
        for _ in range(opts.prompts):
            prompt = [rng.randrange(270) for _ in range(rng.randint(23, 26))]
            for _ in range(opts.group_size):
                r = rng.randint(5, 8)
                tokens.append(prompt + [rng.randrange(270) for _ in range(r)])
                responses.append(r)
                rewards.append(float(rng.random() < 0.5))
        batch = RolloutBatch(
            tokens=tokens,
            response_lengths=responses,
            rewards=rewards,
            loss_masks=[[1] * r for r in responses],
        )
        batch.rollout_log_probs = [[-1.0] * r for r in responses]
        return batch

    def trainer(*extra: str) -> TorchTrainer:
        args = parse_args(
            [
                "--train-backend", "fsdp", "--hf-checkpoint", str(model),
                "--rollout-batch-size", str(opts.prompts), "--n-samples-per-prompt", str(opts.group_size),
                "--global-batch-size", str(samples), "--micro-batch-size", "32", "--num-rollout", "100",
                "--actor-num-gpus-per-node", "1", "--advantage-estimator", "grpo", "--lr", "1e-3",
                "--use-kl-loss", "--kl-loss-coef", "0.05", "--kl-loss-type", "low_var_kl", *extra,
            ]
        )  # fmt: skip
        return TorchTrainer(args).__enter__()

    runs = {"whole samples (baseline)": trainer("--disable-prompt-sharing"), "shared prompts": trainer()}
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for step in range(opts.steps + 1):
        for name, tr in runs.items():
            batch = rollout(step)
            start = time.process_time()
            tr.train_step(batch, rollout_id=step)
            if step:
                seconds[name].append(time.process_time() - start)
    for tr in runs.values():
        tr.close()
    tokens = sum(len(t) for t in rollout(0).tokens)
    print(
        f"{samples} samples, {tokens} tokens per step, {opts.threads} thread(s), CPU seconds per training step:"
    )
    for name, values in seconds.items():
        print(f"  {name:28} median {statistics.median(values):.3f}  best {min(values):.3f}")
    base, shared = (statistics.median(v) for v in seconds.values())
    print(f"shared prompts: {base / shared:.2f}x faster than whole samples (medians)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
