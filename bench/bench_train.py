"""Training throughput of the torch backend against a plain ``transformers`` + torch loop on the same batches.

Both sides train the same random model on the same samples (random prompt and response lengths) with the same
math: SFT loss (−mean log-prob of each sample's response tokens, averaged over the global batch), AdamW, gradient
clipping, one optimizer step per global batch. The plain loop pads each micro-batch of ``--micro-batch-size``
samples to its longest sequence, as a straightforward loop does; the backend packs sequences without padding
(``--use-dynamic-batch-size`` with a token budget equal to the plain loop's average real tokens per micro-batch).
The rate is real (non-padding) tokens per second over the timed steps, after one warm-up step. A full GRPO step of
the backend (reference and old-policy log-prob passes, policy loss with KL loss) is timed too, for reference.

    python -m bench.bench_train --preset cpu-small
    python -m bench.bench_train --preset gpu-0.5b
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.bench_weight_sync import build_random_model

logger = logging.getLogger("bench_train")

PRESETS = {
    "cpu-small": dict(
        model=dict(
            hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=384, vocab_size=4096
        ),
        samples=16,
        prompt=(8, 32),
        response=(8, 96),
        micro_batch_size=4,
        steps=2,
    ),
    "gpu-0.5b": dict(
        model=dict(
            hidden_size=896,
            num_layers=24,
            num_heads=14,
            num_kv_heads=2,
            intermediate_size=4864,
            vocab_size=151936,
        ),
        samples=128,
        prompt=(64, 512),
        response=(64, 1536),
        micro_batch_size=8,
        steps=3,
    ),
}


def make_samples(n: int, prompt: tuple[int, int], response: tuple[int, int], vocab: int, seed: int = 0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        p, r = rng.randint(*prompt), rng.randint(*response)
        out.append(([rng.randrange(vocab) for _ in range(p + r)], r))
    return out


def plain_loop(
    model_dir: Path, samples, *, micro_batch_size: int, steps: int, device: str, bf16: bool
) -> float:
    """Tokens/s of a straightforward padded training loop with transformers (the baseline)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    model.config.use_cache = False
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.01)
    autocast = torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=bf16)
    total_tokens = sum(len(t) for t, _ in samples)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        for start in range(0, len(samples), micro_batch_size):
            chunk = samples[start : start + micro_batch_size]
            width = max(len(t) for t, _ in chunk)
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            mask = torch.zeros(len(chunk), width, dtype=torch.long)
            resp = torch.zeros(len(chunk), width, dtype=torch.float32)
            for i, (tokens, response) in enumerate(chunk):
                ids[i, : len(tokens)] = torch.tensor(tokens)
                mask[i, : len(tokens)] = 1
                resp[i, len(tokens) - response : len(tokens)] = 1.0
            ids, mask, resp = ids.to(device), mask.to(device), resp.to(device)
            with autocast:
                logits = model(input_ids=ids, attention_mask=mask).logits
            logp = (
                torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
            )
            target = resp[:, 1:]
            per_sample = (logp * target).sum(-1) / target.sum(-1).clamp_min(1)
            (-per_sample.sum() / len(samples)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    rate = steps * total_tokens / (time.perf_counter() - start)
    return rate


def backend_rate(model_dir: Path, samples, *, extra: list[str], steps: int, bf16: bool) -> float:
    from services.core.arguments import parse_args
    from trainer.backends.batch import RolloutBatch
    from trainer.backends.torch_backend import TorchTrainer

    argv = [
        "--train-backend", "fsdp", "--hf-checkpoint", str(model_dir), "--rollout-batch-size", str(len(samples)),
        "--num-rollout", str(steps + 1), "--actor-num-gpus-per-node", "1", "--lr", "1e-5", *extra,
    ]  # fmt: skip
    if bf16:
        argv.append("--bf16")
    batch = RolloutBatch(
        tokens=[t for t, _ in samples],
        response_lengths=[r for _, r in samples],
        rewards=[random.Random(i).choice([0.0, 1.0]) for i in range(len(samples))],
        loss_masks=[[1] * r for _, r in samples],
    )
    total_tokens = sum(len(t) for t, _ in samples)
    with TorchTrainer(parse_args(argv)) as trainer:
        trainer.train_step(batch, rollout_id=0)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        _sync(device)
        start = time.perf_counter()
        for i in range(steps):
            trainer.train_step(batch, rollout_id=i + 1)
        _sync(device)
        return steps * total_tokens / (time.perf_counter() - start)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small")
    parser.add_argument("--steps", type=int, default=None, help="timed optimizer steps (after one warm-up)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    opts = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    preset = PRESETS[opts.preset]
    steps = opts.steps or preset["steps"]
    torch.set_num_threads(opts.threads)
    cuda = torch.cuda.is_available()
    device = "cuda:0" if cuda else "cpu"

    model_dir = build_random_model(Path(tempfile.mkdtemp(prefix="bench_train_")) / "model", preset["model"])
    samples = make_samples(
        preset["samples"], preset["prompt"], preset["response"], preset["model"]["vocab_size"]
    )
    mbs = preset["micro_batch_size"]
    budget = mbs * sum(len(t) for t, _ in samples) // len(samples)
    sft = ["--loss-type", "sft_loss", "--disable-compute-advantages-and-returns"]
    packed = ["--use-dynamic-batch-size", "--max-tokens-per-gpu", str(budget)]

    rates = {
        "plain transformers loop (padded micro-batches)": plain_loop(
            model_dir, samples, micro_batch_size=mbs, steps=steps, device=device, bf16=cuda
        ),
        "torch backend, SFT, packed": backend_rate(
            model_dir, samples, extra=[*sft, *packed], steps=steps, bf16=cuda
        ),
        "torch backend, SFT, fixed micro-batches": backend_rate(
            model_dir, samples, extra=[*sft, "--micro-batch-size", str(mbs)], steps=steps, bf16=cuda
        ),
        "torch backend, GRPO step (ref + old log-probs + policy loss), packed": backend_rate(
            model_dir,
            samples,
            extra=[*packed, "--use-kl-loss", "--kl-loss-coef", "0.01"],
            steps=steps,
            bf16=cuda,
        ),
    }
    baseline = rates["plain transformers loop (padded micro-batches)"]
    real = sum(len(t) for t, _ in samples)
    padded = sum(
        len(samples[s : s + mbs]) * max(len(t) for t, _ in samples[s : s + mbs])
        for s in range(0, len(samples), mbs)
    )
    where = torch.cuda.get_device_name(0) if cuda else f"CPU ({os.cpu_count()} cores, {opts.threads} threads)"
    print(f"\ntraining throughput, preset {opts.preset}, {where}, {'bf16 autocast' if cuda else 'fp32'}")
    print(
        f"{len(samples)} samples, {real} real tokens per step, {padded - real} padding tokens in the plain loop"
    )
    print("| path | tokens/s | vs plain loop |")
    print("|---|---|---|")
    for name, rate in rates.items():
        print(f"| {name} | {rate:,.0f} | {rate / baseline:.2f}x |")
    if opts.out is not None:
        opts.out.write_text(
            json.dumps({"preset": opts.preset, "device": where, "tokens_per_s": rates}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
