"""Weight-sync throughput of each transport against this host's memory-copy bandwidth (the limit).

The trainer (torch backend, one rank) pushes the weights of a random model to a built-in engine over each
transport several times; the rate is payload bytes / push time (gather, send, the engine's load, all included).
The limit each transport is measured against, in the same run:

- ``tensor`` (colocated): the engine maps the trainer's memory and copies it in, so the limit is one copy in that
  memory: host memcpy on CPU, device-to-device copy on GPU (CUDA IPC);
- ``distributed``: one broadcast per bucket; on CPU (gloo over loopback) the limit is again a host copy, on GPU
  (NCCL, trainer and engine on different GPUs) the GPU-to-GPU copy;
- ``disk``: safetensors written and read back through the page cache; a host copy bounds it.

The engine's log-probs are checked against the trainer's after the last push of each transport.

``--load-formats`` compares instead the two wire formats of the ``distributed`` transport: one broadcast per tensor
(SGLang's default) against one broadcast of each bucket's bytes (``load_format="flattened_bucket"``). This process
is rank 0 of a gloo group with two built-in engine servers and pushes the quick-start model and a random ~80 MB
one with a ``DistributedSender`` of each kind, alternating, so both see the same host load; a push is every bucket
sent and loaded by both engines.

    python -m bench.bench_weight_sync --preset cpu-40m
    python -m bench.bench_weight_sync --preset gpu-0.5b    # needs 2 GPUs for the NCCL transport
    python -m bench.bench_weight_sync --load-formats --pushes 15
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import torch

if TYPE_CHECKING:
    from trainer.weight_sync.transports import WeightSender

logger = logging.getLogger("bench_weight_sync")

PRESETS = {
    # ~40M parameters (160 MB in fp32): enough to see bandwidth, small enough for a shared CPU host.
    "cpu-40m": dict(
        hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=2, intermediate_size=1536, vocab_size=32000
    ),
    # ~20M parameters (81 MB in fp32, 50 tensors like the quick-start model): the --load-formats comparison.
    "cpu-20m": dict(
        hidden_size=512, num_layers=4, num_heads=8, num_kv_heads=2, intermediate_size=1536, vocab_size=16000
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


def build_random_model(out: Path, preset: dict, dtype: str = "float32") -> Path:
    """A Hugging Face directory with random weights of the preset's shape and a small real tokenizer; the
    embedding is widened past the tokenizer when the preset's vocabulary is larger (as Qwen pads its own)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from services.core.tiny_model import build_tiny_model, default_corpus

    shape = {k: v for k, v in preset.items() if k != "vocab_size"}
    build_tiny_model(
        out, **shape, max_position_embeddings=4096, dtype=dtype, corpus=default_corpus(lines=200)
    )
    config = AutoConfig.from_pretrained(out)
    config.vocab_size = preset["vocab_size"]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(getattr(torch, dtype))
    model.save_pretrained(out)
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_rate(src_device: str, dst_device: str, nbytes: int = 1 << 30) -> float:
    """Bytes per second of one large copy from ``src_device`` to ``dst_device`` (best of five, bytes counted
    once: the payload rate, comparable to a transport's)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=src_device).uniform_()
    dst = torch.empty_like(src, device=dst_device)
    timings = []
    for _ in range(5):
        for dev in {src.device, dst.device}:
            _sync(dev)
        start = time.perf_counter()
        dst.copy_(src)
        for dev in {src.device, dst.device}:
            _sync(dev)
        timings.append(time.perf_counter() - start)
    return nbytes / min(timings)


def start_engine(
    model_dir: Path, *, gpu: int | None, dtype: str, threads: int
) -> tuple[subprocess.Popen, str]:
    from services.core.net import free_port, wait_http_ok

    port = free_port()
    env = dict(os.environ)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    argv = [
        sys.executable,
        "-m",
        "services.rollout_engine.server",
        "--hf-checkpoint",
        str(model_dir),
        "--port",
        str(port),
        "--engine-backend",
        "builtin",
        "--engine-dtype",
        dtype,
        "--num-threads",
        str(threads),
        "--kv-cache-memory-gb",
        "1",
        "--log-level",
        "WARNING",
    ]
    proc = subprocess.Popen(argv, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http_ok(f"{url}/health", timeout=600)
    except BaseException:
        proc.kill()
        raise
    return proc, url


def stop_engine(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def engine_gap(trainer, url: str) -> float:
    """Largest |engine log-prob − trainer log-prob| over a short sampled continuation."""
    from trainer.backends.batch import RolloutBatch

    prompt = [5, 17, 33, 2, 9, 11, 40, 7]
    body = {
        "input_ids": prompt,
        "sampling_params": {"temperature": 1.0, "max_new_tokens": 16, "ignore_eos": True},
        "return_logprob": True,
    }
    out = httpx.post(f"{url}/generate", json=body, timeout=120).json()["meta_info"]["output_token_logprobs"]
    batch = RolloutBatch(
        tokens=[prompt + [t for _, t, *_ in out]],
        response_lengths=[len(out)],
        rewards=[0.0],
        loss_masks=[[1] * len(out)],
    )
    ours = trainer.compute_log_probs(batch)[0]
    return max(abs(a - lp) for a, (lp, *_) in zip(ours, out, strict=True))


QUICKSTART_MODEL = Path(__file__).resolve().parents[1] / "examples" / "quickstart" / "model"


def time_pushes(
    senders: dict[str, WeightSender], named: list[tuple[str, torch.Tensor]], bucket_bytes: int, pushes: int
) -> dict[str, list[float]]:
    """Seconds of ``pushes`` full pushes per sender (after one warm-up each), the senders taking turns."""
    from trainer.weight_sync.transports import plan_buckets

    by_name = dict(named)
    buckets = plan_buckets([(n, t.numel() * t.element_size()) for n, t in named], bucket_bytes)
    timings: dict[str, list[float]] = {label: [] for label in senders}
    for round_ in range(pushes + 1):
        for label, sender in senders.items():
            start = time.perf_counter()
            sender.begin(f"{label}-{round_}")
            for names in buckets:
                sender.send([(name, by_name[name]) for name in names])
            sender.finish()
            if round_:
                timings[label].append(time.perf_counter() - start)
    return timings


def compare_load_formats(opts: argparse.Namespace) -> int:
    """Per-tensor against flattened-bucket broadcasts to two engines, on the quick-start and a random model."""
    from safetensors.torch import load_file

    from services.core.net import free_port
    from trainer.weight_sync.engine_client import EngineClient
    from trainer.weight_sync.transports import FLATTENED_BUCKET, DistributedSender

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="bench_weight_sync_"))
    models = {
        "quick-start": QUICKSTART_MODEL,
        "random cpu-20m": build_random_model(work / "cpu-20m", PRESETS["cpu-20m"]),
    }
    rows = []
    for model_name, model_dir in models.items():
        named = sorted(load_file(str(model_dir / "model.safetensors")).items())
        engines: list[tuple[subprocess.Popen, str]] = []
        senders: dict[str, DistributedSender] = {}
        try:
            for _ in range(2):
                engines.append(start_engine(model_dir, gpu=None, dtype="float32", threads=1))
            urls = [url for _, url in engines]
            for kind, flattened in (("per-tensor", False), ("flattened", True)):
                senders[kind] = DistributedSender(
                    [EngineClient(url) for url in urls],
                    device=torch.device("cpu"),
                    master_port=free_port(),
                    flattened_buckets=flattened,
                )
                senders[kind].connect()
            if senders["flattened"].load_format != FLATTENED_BUCKET:
                raise RuntimeError("the built-in engines do not advertise flattened_bucket")
            timings = time_pushes(senders, named, opts.bucket_mb << 20, opts.pushes)
            for url in urls:
                with EngineClient(url) as engine:
                    if engine.get_weight_version() != f"flattened-{opts.pushes}":
                        raise RuntimeError(f"engine {url} does not serve the last push")
        finally:
            for sender in senders.values():
                sender.close()
            for proc, _ in engines:
                stop_engine(proc)
        per_tensor, flattened = (statistics.median(timings[k]) for k in ("per-tensor", "flattened"))
        rows.append(
            {
                "model": model_name,
                "tensors": len(named),
                "payload_mb": sum(t.numel() * t.element_size() for _, t in named) / 1e6,
                "pushes": opts.pushes,
                "per_tensor_s": per_tensor,
                "flattened_s": flattened,
                "speedup": per_tensor / flattened,
                "timings": timings,
            }
        )

    print(f"\ndistributed weight sync (gloo), 2 built-in engines, CPU ({os.cpu_count()} cores)")
    print(
        "| model | tensors | payload MB | pushes | per-tensor s (median) | flattened s (median) | per-tensor / flattened |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['tensors']} | {r['payload_mb']:.1f} | {r['pushes']} | {r['per_tensor_s']:.4f} | "
            f"{r['flattened_s']:.4f} | {r['speedup']:.2f}x |"
        )
    if opts.out is not None:
        opts.out.write_text(json.dumps(rows, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-40m")
    parser.add_argument("--transports", nargs="+", default=["tensor", "distributed", "disk"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bucket-mb", type=int, default=512, help="--update-weight-buffer-size in MiB")
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument(
        "--load-formats",
        action="store_true",
        help="compare per-tensor and flattened-bucket broadcasts (distributed transport, two engines) instead",
    )
    parser.add_argument(
        "--pushes", type=int, default=15, help="timed pushes per load format (--load-formats)"
    )
    opts = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if opts.load_formats:
        return compare_load_formats(opts)

    from services.core.arguments import parse_args
    from trainer.backends.torch_backend import TorchTrainer

    cuda = torch.cuda.is_available()
    gpus = torch.cuda.device_count() if cuda else 0
    dtype = "bfloat16" if cuda else "float32"
    torch.set_num_threads(opts.threads)
    work = Path(tempfile.mkdtemp(prefix="bench_weight_sync_"))
    model_dir = build_random_model(work / "model", PRESETS[opts.preset], dtype="float32")

    baselines = {"host memcpy": copy_rate("cpu", "cpu")}
    if cuda:
        baselines["GPU device-to-device"] = copy_rate("cuda:0", "cuda:0")
        if gpus > 1:
            baselines["GPU0 -> GPU1"] = copy_rate("cuda:0", "cuda:1")
    limit_of = {
        "tensor": "GPU device-to-device" if cuda else "host memcpy",
        "distributed": "GPU0 -> GPU1" if cuda else "host memcpy",
        "disk": "host memcpy",
    }

    argv_train = [
        "--train-backend", "fsdp", "--hf-checkpoint", str(model_dir), "--rollout-batch-size", "1",
        "--num-rollout", "1", "--actor-num-gpus-per-node", "1",
        "--update-weight-buffer-size", str(opts.bucket_mb << 20),
    ]  # fmt: skip
    if cuda:
        argv_train.append("--bf16")
    args = parse_args(argv_train)
    results = []
    engines: dict[int | None, tuple[subprocess.Popen, str]] = {}
    trainer = TorchTrainer(args)
    try:
        for transport in opts.transports:
            if transport == "distributed" and cuda and gpus < 2:
                logger.warning("skipping distributed: NCCL needs the engine on a second GPU")
                continue
            # Colocated engines share the trainer's GPU; the others sit on the next one.
            gpu = (0 if transport == "tensor" or gpus < 2 else 1) if cuda else None
            if gpu not in engines:
                engines[gpu] = start_engine(model_dir, gpu=gpu, dtype=dtype, threads=opts.threads)
            url = engines[gpu][1]
            reports = [
                trainer.update_weights([url], transport=transport, disk_dir=str(work / "disk"))
                for _ in range(opts.repeats + 1)
            ][1:]
            push = statistics.median(r.push_seconds for r in reports)
            total = statistics.median(r.total_seconds for r in reports)
            rate = reports[0].bytes / push
            limit = baselines[limit_of[transport]]
            results.append(
                {
                    "transport": transport,
                    "payload_gb": reports[0].bytes / 1e9,
                    "buckets": reports[0].buckets,
                    "push_s": push,
                    "total_s": total,
                    "gb_per_s": rate / 1e9,
                    "limit": limit_of[transport],
                    "limit_gb_per_s": limit / 1e9,
                    "fraction_of_limit": rate / limit,
                    "max_logprob_gap": engine_gap(trainer, url),
                }
            )
    finally:
        trainer.close()
        for proc, _ in engines.values():
            stop_engine(proc)

    device = torch.cuda.get_device_name(0) if cuda else f"CPU ({os.cpu_count()} cores)"
    print(f"\nweight sync, preset {opts.preset}, {device}, payload dtype {dtype}")
    for name, rate in baselines.items():
        print(f"  baseline {name}: {rate / 1e9:.2f} GB/s")
    print(
        "| transport | payload GB | buckets | push s | total s | GB/s | limit (GB/s) | of limit | max log-prob gap |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['transport']} | {r['payload_gb']:.3f} | {r['buckets']} | {r['push_s']:.3f} | {r['total_s']:.3f} | "
            f"{r['gb_per_s']:.2f} | {r['limit']} ({r['limit_gb_per_s']:.1f}) | {r['fraction_of_limit']:.0%} | "
            f"{r['max_logprob_gap']:.2e} |"
        )
    if opts.out is not None:
        opts.out.write_text(
            json.dumps(
                {"preset": opts.preset, "device": device, "baselines": baselines, "results": results},
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
