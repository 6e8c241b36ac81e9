"""Generation throughput of the built-in engine against Hugging Face ``transformers`` ``generate``.

Same random-weight model, same prompts (random token ids), same number of new tokens (EOS ignored), greedy
decoding on both sides, at several batch sizes. Also estimates the memory-bandwidth floor of one decode step
(bytes of weights read per step / measured copy bandwidth) to show how far each side is from it.

    python -m bench.bench_engine --preset cpu-10m          # ~10M parameters on CPU
    python -m bench.bench_engine --preset gpu-0.5b         # ~0.5B parameters on a GPU

``--on-policy`` also prices the true on-policy mode (``--sglang-rl-on-policy-target fsdp``): the engine with
``return_logprob`` in its normal mode against the same with every finished request rescored by the trainer's
per-sequence forward.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import logging
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

logger = logging.getLogger("bench_engine")

PRESETS = {
    # ~10M parameters: 10 layers of width 256 (the vocabulary of the small tokenizer adds ~0.1M).
    "cpu-10m": dict(
        hidden_size=256, num_layers=10, num_heads=4, num_kv_heads=2, intermediate_size=1024, vocab_size=None
    ),
    # Qwen2.5-0.5B's shape (tied 151,936-token embedding) with random weights: ~0.49B parameters.
    "gpu-0.5b": dict(
        hidden_size=896,
        num_layers=24,
        num_heads=14,
        num_kv_heads=2,
        intermediate_size=4864,
        vocab_size=151936,
    ),
}


@dataclass
class Result:
    batch: int
    engine_tok_s: float
    hf_tok_s: float
    ratio: float
    engine_step_ms: float
    hf_step_ms: float
    logprob_tok_s: float | None = None
    on_policy_tok_s: float | None = None


def build_model(out: Path, preset: dict, dtype: str, max_positions: int) -> Path:
    """A tiny-tokenizer model directory; for a large vocabulary the embedding is widened after building."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from services.core.tiny_model import build_tiny_model

    shape = {k: v for k, v in preset.items() if k != "vocab_size"}
    build_tiny_model(out, **shape, max_position_embeddings=max_positions, dtype=dtype)
    if preset["vocab_size"]:
        # Padded vocabularies are normal (Qwen's is 151,936 for ~151k tokens); ids past the tokenizer are unused.
        config = AutoConfig.from_pretrained(out)
        config.vocab_size = preset["vocab_size"]
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).to(getattr(torch, dtype))
        model.save_pretrained(out)
    return out


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Bytes moved per second by a large device-to-device copy (read + write counted)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    timings = []
    for _ in range(5):
        _sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        timings.append(time.perf_counter() - start)
    return 2 * nbytes / min(timings)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_engine(
    model_dir: Path,
    prompts: list[list[int]],
    new_tokens: int,
    device: str,
    repeats: int,
    *,
    return_logprob: bool = False,
    on_policy_target: str | None = None,
) -> float:
    """Tokens per second of the built-in engine (in-process scheduler, no HTTP), best of ``repeats``."""
    from services.core.wire import SamplingParams
    from services.rollout_engine.engine import BuiltinEngine, EngineSettings
    from services.rollout_engine.requests import GenerationParams

    engine = BuiltinEngine(
        EngineSettings(
            model_path=str(model_dir),
            device=device,
            max_running_requests=max(len(prompts), 1),
            context_length=len(prompts[0]) + new_tokens + 1,
            rl_on_policy_target=on_policy_target,
        )
    )
    engine.start()
    params = GenerationParams.from_wire(
        SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True), engine.vocab_size
    )

    async def once(tag: str) -> float:
        async def one(i: int, ids: list[int]) -> int:
            last = None
            async for snap in engine.generate(f"{tag}-{i}", ids, params, return_logprob=return_logprob):
                last = snap
            return len(last.output_ids)

        start = time.perf_counter()
        counts = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
        elapsed = time.perf_counter() - start
        assert all(c == new_tokens for c in counts), counts
        return sum(counts) / elapsed

    try:
        asyncio.run(once("warmup"))
        return max(asyncio.run(once(f"run{r}")) for r in range(repeats))
    finally:
        engine.stop()


def run_hf(model, prompts: list[list[int]], new_tokens: int, device: torch.device, repeats: int) -> float:
    ids = torch.tensor(prompts, device=device)
    mask = torch.ones_like(ids)
    best = 0.0
    for r in range(repeats + 1):
        _sync(device)
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
            )
        _sync(device)
        elapsed = time.perf_counter() - start
        assert out.shape[1] == ids.shape[1] + new_tokens
        if r > 0:  # the first run is warm-up
            best = max(best, ids.shape[0] * new_tokens / elapsed)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-10m")
    parser.add_argument(
        "--model-dir", type=Path, default=None, help="Reuse/keep the model here (built if absent)."
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto.")
    parser.add_argument(
        "--dtype", default=None, help="Weights dtype (default: float32 on CPU, bfloat16 on GPU)."
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="Timed runs per measurement (best is kept).")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)."
    )
    parser.add_argument("--hf-attn", default="sdpa", help="transformers attn_implementation of the baseline.")
    parser.add_argument("--json", type=Path, default=None, help="Also write the results here.")
    parser.add_argument(
        "--on-policy", action="store_true", help="Also measure the true on-policy mode's cost (see above)."
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("services", "transformers", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(
        "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device.replace("auto", "cpu")
    )
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    preset = PRESETS[args.preset]
    max_positions = args.prompt_len + args.new_tokens + 64

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir or Path(tmp) / args.preset
        if not (model_dir / "config.json").is_file():
            build_model(model_dir, preset, dtype, max_positions)
        from transformers import AutoModelForCausalLM

        hf = (
            AutoModelForCausalLM.from_pretrained(
                model_dir, dtype=getattr(torch, dtype), attn_implementation=args.hf_attn
            )
            .to(device)
            .eval()
        )
        n_params = sum(p.numel() for p in hf.parameters())
        weight_bytes = sum(p.numel() * p.element_size() for p in hf.parameters())
        vocab = hf.config.vocab_size
        bandwidth = copy_bandwidth(device, 1 << 30 if device.type == "cuda" else 256 << 20)
        floor_ms = weight_bytes / bandwidth * 1e3
        logger.info(
            "model: %s, %.1fM parameters (%s, %.0f MB), device %s, threads %d",
            args.preset,
            n_params / 1e6,
            dtype,
            weight_bytes / 1e6,
            device,
            torch.get_num_threads(),
        )
        logger.info(
            "copy bandwidth %.1f GB/s -> decode floor %.3f ms/step (weights read once per step)",
            bandwidth / 1e9,
            floor_ms,
        )
        gen = torch.Generator().manual_seed(0)
        # Token ids inside the tokenizer's range, so both sides see ordinary prompts.
        results = []
        for batch in args.batch_sizes:
            prompts = torch.randint(3, min(vocab, 400), (batch, args.prompt_len), generator=gen).tolist()
            hf_tps = run_hf(hf, prompts, args.new_tokens, device, args.repeats)
            engine_tps = run_engine(model_dir, prompts, args.new_tokens, str(device), args.repeats)
            result = Result(
                batch=batch,
                engine_tok_s=engine_tps,
                hf_tok_s=hf_tps,
                ratio=engine_tps / hf_tps,
                engine_step_ms=batch / engine_tps * 1e3,
                hf_step_ms=batch / hf_tps * 1e3,
            )
            if args.on_policy:
                run = functools.partial(
                    run_engine, model_dir, prompts, args.new_tokens, str(device), args.repeats
                )
                result.logprob_tok_s = run(return_logprob=True)
                result.on_policy_tok_s = run(return_logprob=True, on_policy_target="fsdp")
                logger.info(
                    "batch %3d: with log-probs %9.1f tok/s | true on-policy %9.1f tok/s | ratio %.2fx",
                    batch,
                    result.logprob_tok_s,
                    result.on_policy_tok_s,
                    result.on_policy_tok_s / result.logprob_tok_s,
                )
            results.append(result)
            logger.info(
                "batch %3d: engine %9.1f tok/s (%.2f ms/step, floor x%.1f) | transformers %9.1f tok/s (%.2f ms/step)"
                " | ratio %.2fx",
                batch,
                engine_tps,
                result.engine_step_ms,
                result.engine_step_ms / floor_ms,
                hf_tps,
                result.hf_step_ms,
                result.ratio,
            )
        summary = {
            "preset": args.preset,
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "dtype": dtype,
            "parameters": n_params,
            "weight_bytes": weight_bytes,
            "copy_bandwidth_gb_s": bandwidth / 1e9,
            "decode_floor_ms": floor_ms,
            "threads": torch.get_num_threads(),
            "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens,
            "hf_attn": args.hf_attn,
            "geomean_ratio": statistics.geometric_mean([r.ratio for r in results]),
            "results": [asdict(r) for r in results],
        }
        print(json.dumps(summary, indent=2))
        if args.json:
            args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
