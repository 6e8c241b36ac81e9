"""The distributed transport's two wire formats against two real engine servers on loopback (gloo): flattened
buckets (one broadcast of a bucket's bytes) when every engine advertises them, one broadcast per tensor otherwise;
either way the engines end up serving exactly the pushed weights."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from services.core.net import free_port
from services.rollout_engine.weight_transport import tensors_from_bytes
from tests.engine_servers import engine_process
from trainer.weight_sync.engine_client import EngineClient
from trainer.weight_sync.transports import (
    DistributedSender,
    distributed_load_format,
    flatten_to_bytes,
    plan_buckets,
)

PROMPTS = ([5, 17, 33, 2, 9], [100, 4, 8, 61])


@pytest.fixture(scope="module")
def engine_urls(tiny_model_dir, tmp_path_factory) -> Iterator[list[str]]:
    logs = tmp_path_factory.mktemp("engine-logs")
    with engine_process(tiny_model_dir, logs) as first, engine_process(tiny_model_dir, logs) as second:
        urls = [first.url, second.url]
        # A process's first generation may round differently in the last bit from every later one (the CPU math
        # library settles its code paths on first use); the comparisons below are between later ones.
        for url in urls:
            _outputs(url)
        yield urls


@pytest.fixture(scope="module")
def pushed(tiny_model_dir, tmp_path_factory) -> tuple[list[tuple[str, torch.Tensor]], Path]:
    """Weights unlike the checkpoint's, the MLP ones in bfloat16 (as ``--bf16`` training sends them), and a copy of
    the checkpoint directory holding exactly those values in float32: what the engines must serve afterwards."""
    generator = torch.Generator().manual_seed(7)
    weights = load_file(str(tiny_model_dir / "model.safetensors"))
    sent = []
    for name, tensor in sorted(weights.items()):
        tensor = tensor + 0.05 * torch.randn(tensor.shape, generator=generator)
        sent.append((name, tensor.to(torch.bfloat16) if ".mlp." in name else tensor))
    reference = shutil.copytree(tiny_model_dir, tmp_path_factory.mktemp("pushed") / "model")
    save_file({n: t.float().contiguous() for n, t in sent}, str(reference / "model.safetensors"))
    return sent, reference


def _outputs(url: str) -> list[tuple[list[int], list[float]]]:
    """Greedy continuations and their log-probs: any weight that differs by a bit shows up here. The KV cache is
    flushed first (as a weight sync does), so the answers depend on the weights alone."""
    httpx.get(f"{url}/flush_cache", timeout=60).raise_for_status()
    out = []
    for prompt in PROMPTS:
        body = {
            "input_ids": prompt,
            "sampling_params": {"temperature": 0.0, "max_new_tokens": 8, "ignore_eos": True},
            "return_logprob": True,
        }
        answer = httpx.post(f"{url}/generate", json=body, timeout=60).json()
        out.append((answer["output_ids"], [lp for lp, *_ in answer["meta_info"]["output_token_logprobs"]]))
    return out


def _load_from_disk(url: str, model_dir: Path) -> None:
    httpx.post(
        f"{url}/update_weights_from_disk", json={"model_path": str(model_dir)}, timeout=60
    ).raise_for_status()


def _push(sender: DistributedSender, named: list[tuple[str, torch.Tensor]], version: str, limit: int) -> int:
    buckets = plan_buckets([(n, t.numel() * t.element_size()) for n, t in named], limit)
    by_name = dict(named)
    sender.begin(version)
    for names in buckets:
        sender.send([(name, by_name[name]) for name in names])
    sender.finish()
    return len(buckets)


@pytest.mark.parametrize("flattened", [True, False], ids=["flattened-buckets", "per-tensor"])
def test_engines_serve_exactly_the_pushed_weights(
    engine_urls, pushed, tiny_model_dir, flattened, caplog
) -> None:
    named, reference = pushed
    for url in engine_urls:
        _load_from_disk(url, reference)
    expected = [_outputs(url) for url in engine_urls]
    for url in engine_urls:
        _load_from_disk(url, tiny_model_dir)
    assert [_outputs(url) for url in engine_urls] != expected, "the pushed weights should change the answers"

    # Buckets of ~2 layers: several requests per push, most of them holding both bf16 and fp32 tensors.
    limit = sum(t.numel() * t.element_size() for _, t in named) // 4
    sender = DistributedSender(
        [EngineClient(url) for url in engine_urls],
        device=torch.device("cpu"),
        master_port=free_port(),
        timeout_s=60,
        flattened_buckets=flattened,
    )
    try:
        with caplog.at_level(logging.INFO, logger="trainer.weight_sync.transports"):
            assert _push(sender, named, "1", limit) > 2
            assert _push(sender, named, "2", limit) > 2
    finally:
        sender.close()

    assert sender.load_format == ("flattened_bucket" if flattened else None)
    announced = [r.getMessage() for r in caplog.records if "weight-update group" in r.getMessage()]
    assert len(announced) == 1
    assert ("one broadcast per bucket" if flattened else "one broadcast per tensor") in announced[0]
    assert sender.bytes_sent == sum(t.numel() * t.element_size() for _, t in named)
    for url, want in zip(engine_urls, expected, strict=True):
        with EngineClient(url) as engine:
            assert engine.get_weight_version() == "2"
        assert _outputs(url) == want


def test_flattened_bucket_is_used_only_when_every_engine_advertises_it() -> None:
    builtin = {"engine_backend": "builtin", "weight_update_load_formats": ["flattened_bucket"]}
    sglang = {"tp_size": 1, "version": "0.4.9"}  # an SGLang server: no such field
    assert distributed_load_format([builtin, builtin]) == "flattened_bucket"
    assert distributed_load_format([builtin, sglang]) is None
    assert distributed_load_format([sglang]) is None
    assert distributed_load_format([{"weight_update_load_formats": None}]) is None
    assert distributed_load_format([{"weight_update_load_formats": ["direct"]}]) is None
    assert distributed_load_format([]) is None


def test_a_bucket_of_mixed_dtypes_flattens_to_its_bytes_in_order() -> None:
    tensors = [
        torch.randn(3, dtype=torch.bfloat16),  # odd-sized: the next tensor starts off a 4-byte boundary
        torch.randn(4, 5).t(),  # not contiguous
        torch.randn(()),
        torch.empty(0, 3),
        torch.randn(2, 2, dtype=torch.float16),
        torch.randn(5, dtype=torch.float64),
    ]
    flat = flatten_to_bytes(tensors)
    assert flat.dtype == torch.uint8
    assert flat.numel() == sum(t.numel() * t.element_size() for t in tensors)
    rebuilt = tensors_from_bytes(flat, [list(t.shape) for t in tensors], [t.dtype for t in tensors])
    for got, sent in zip(rebuilt, tensors, strict=True):
        assert got.dtype == sent.dtype and torch.equal(got, sent)
        assert torch.equal(
            got.contiguous().view(-1).view(torch.uint8), sent.contiguous().view(-1).view(torch.uint8)
        )
