"""Training throughput of the Megatron backend against the torch backend (the baseline), same GPU, same batches.

A random Qwen2-style model of about 0.5B parameters (Qwen2.5-0.5B's shape), bf16, one GPU. One timed RL step is
``train_step``: the log-prob pass over the rollout plus the optimizer steps (forward and backward), packed
sequences, dynamic micro-batches of ``--max-tokens-per-gpu`` tokens. Model FLOPs per step are
``(2 + 6) · P · T`` (a forward for the log-probs, forward and backward for training), P the parameters that
multiply activations (the tied output projection included, attention scores excluded), T the tokens of the step;
MFU divides by the GPU's dense bf16 peak (``--peak-tflops``, 989 for an H100 SXM).

    python bench/bench_megatron.py --samples 64 --seq-len 1024 --steps 3
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import tempfile
import time
from pathlib import Path

logger = logging.getLogger("bench_megatron")


def build_model(
    out: Path, *, layers: int, hidden: int, heads: int, kv_heads: int, ffn: int, vocab: int
) -> int:
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=ffn,
        max_position_embeddings=32768,
        tie_word_embeddings=True,
        rope_theta=1000000.0,
        architectures=["Qwen2ForCausalLM"],
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def batch(samples: int, seq_len: int, vocab: int, seed: int):
    from trainer.backends.batch import RolloutBatch

    rng = random.Random(seed)
    tokens, responses, rewards, masks = [], [], [], []
    for _ in range(samples):
        total = rng.randint(seq_len // 2, seq_len)
        response = total // 2
        tokens.append([rng.randrange(vocab) for _ in range(total)])
        responses.append(response)
        rewards.append(rng.random())
        masks.append([1] * response)
    return RolloutBatch(tokens=tokens, response_lengths=responses, rewards=rewards, loss_masks=masks)


def measure(backend: str, model_dir: Path, opts: argparse.Namespace, params: int) -> dict[str, float]:
    import torch

    from services.core.arguments import parse_args

    args = parse_args(
        [
            "--train-backend", backend, "--hf-checkpoint", str(model_dir), "--bf16",
            "--rollout-batch-size", str(opts.samples), "--n-samples-per-prompt", "1",
            "--global-batch-size", str(opts.samples), "--num-rollout", "100",
            "--use-dynamic-batch-size", "--max-tokens-per-gpu", str(opts.max_tokens_per_gpu),
            "--actor-num-gpus-per-node", "1", "--lr", "1e-6",
        ]
    )  # fmt: skip
    if backend == "megatron":
        from trainer.backends.megatron_backend.trainer import MegatronTrainer as Trainer
    else:
        from trainer.backends.torch_backend import TorchTrainer as Trainer
    times, tokens = [], 0
    with Trainer(args) as trainer:
        trainer.train_step(batch(opts.samples, opts.seq_len, opts.vocab, seed=100), rollout_id=0)  # warm-up
        for step in range(opts.steps):
            data = batch(opts.samples, opts.seq_len, opts.vocab, seed=step)
            torch.cuda.synchronize()
            start = time.perf_counter()
            trainer.train_step(data, rollout_id=step + 1)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            tokens = sum(len(t) for t in data.tokens)
    seconds = sorted(times)[len(times) // 2]
    tflops = 8 * params * tokens / seconds / 1e12
    return {
        "step_seconds": seconds,
        "tokens_per_step": tokens,
        "tokens_per_s": tokens / seconds,
        "model_tflops": tflops,
        "mfu": tflops / opts.peak_tflops,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--max-tokens-per-gpu", type=int, default=16384)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=896)
    parser.add_argument("--heads", type=int, default=14)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--ffn", type=int, default=4864)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--backends", nargs="+", default=["fsdp", "megatron"])
    parser.add_argument("--json", type=Path, default=None, help="Also write the results here.")
    opts = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        params = build_model(
            model_dir,
            layers=opts.layers,
            hidden=opts.hidden,
            heads=opts.heads,
            kv_heads=opts.kv_heads,
            ffn=opts.ffn,
            vocab=opts.vocab,
        )
        results = {backend: measure(backend, model_dir, opts, params) for backend in opts.backends}
    device = torch.cuda.get_device_name()
    print(
        f"device: {device}; model: {params / 1e6:.0f}M parameters; {opts.samples} samples of <= {opts.seq_len} tokens"
    )
    print("| backend | step s | tokens/step | tokens/s | model TFLOP/s | MFU | vs torch |")
    print("|---|---|---|---|---|---|---|")
    base = results.get("fsdp", {}).get("tokens_per_s")
    for backend, r in results.items():
        ratio = f"{r['tokens_per_s'] / base:.2f}x" if base else "-"
        print(
            f"| {backend} | {r['step_seconds']:.3f} | {r['tokens_per_step']} | {r['tokens_per_s']:.0f} | "
            f"{r['model_tflops']:.1f} | {r['mfu'] * 100:.1f}% | {ratio} |"
        )
    if opts.json is not None:
        opts.json.write_text(json.dumps({"device": device, "params": params, "results": results}, indent=2))


if __name__ == "__main__":
    main()
