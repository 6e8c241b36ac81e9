"""The built-in engine on a CUDA device: CUDA-graph decode against transformers, CUDA IPC weight updates, and
release/resume of device memory. Skipped without a GPU."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
from pathlib import Path

import pytest
import torch

from services.core.wire import SamplingParams
from services.rollout_engine.engine import BuiltinEngine, EngineSettings
from services.rollout_engine.requests import GenerationParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(scope="module")
def cuda_engine(tiny_model_dir: Path):
    engine = BuiltinEngine(EngineSettings(model_path=str(tiny_model_dir), device="cuda", dtype="float32"))
    engine.start()
    loop = asyncio.new_event_loop()
    yield engine, loop
    engine.stop()
    loop.close()


def _hf(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).cuda().eval()


def _run(engine: BuiltinEngine, loop, prompts, temperature: float, n: int, seed: int = 0) -> list:
    params = GenerationParams.from_wire(
        SamplingParams(max_new_tokens=n, temperature=temperature, ignore_eos=True, sampling_seed=seed),
        engine.vocab_size,
    )

    async def one(i: int, prompt: list[int]):
        last = None
        async for snap in engine.generate(
            f"gpu-{i}-{temperature}-{seed}", prompt, params, return_logprob=True
        ):
            last = snap
        return last

    async def many():
        return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))

    return loop.run_until_complete(many())


def _check_against(model, prompts, snaps, temperature: float) -> None:
    for prompt, snap in zip(prompts, snaps, strict=True):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + snap.output_ids], device="cuda")).logits[
                0, len(prompt) - 1 : -1
            ]
        logprobs = torch.log_softmax(logits.float() / (temperature or 1.0), dim=-1)
        expected = logprobs.gather(1, torch.tensor(snap.output_ids, device="cuda").unsqueeze(1)).squeeze(1)
        got = torch.tensor(snap.output_logprobs, device="cuda")
        assert torch.allclose(got, expected, atol=1e-3), (got - expected).abs().max()
        if temperature == 0:
            assert logits.argmax(dim=-1).tolist() == snap.output_ids


def test_cuda_graph_decode_matches_transformers(cuda_engine, tiny_model_dir: Path) -> None:
    engine, loop = cuda_engine
    reference = _hf(tiny_model_dir)
    gen = torch.Generator().manual_seed(0)
    prompts = [
        torch.randint(3, 400, (int(n),), generator=gen).tolist()
        for n in torch.randint(1, 40, (37,), generator=gen)
    ]
    for temperature in (0.0, 1.0):
        snaps = _run(engine, loop, prompts, temperature, 48)
        assert all(len(s.output_ids) == 48 for s in snaps)
        _check_against(reference, prompts, snaps, temperature)
    assert engine.scheduler.graphs is not None and engine.scheduler.graphs._graphs, (
        "decode never used a CUDA graph"
    )


def _ipc_sender(model_dir: str, conn) -> None:
    from safetensors.torch import load_file

    from services.rollout_engine.weight_transport import flatten_bucket, serialize

    tensors = {k: v.cuda() for k, v in load_file(f"{model_dir}/model.safetensors").items()}
    bucket = flatten_bucket(sorted(tensors.items()))
    conn.send(serialize(bucket))
    conn.recv()  # keep the memory alive until the engine has copied it


def test_cuda_ipc_tensor_update_and_memory_release(cuda_engine, other_model_dir: Path) -> None:
    engine, loop = cuda_engine
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    sender = ctx.Process(target=_ipc_sender, args=(str(other_model_dir), child))
    sender.start()
    try:
        payload = parent.recv()
        count = loop.run_until_complete(engine.update_from_tensor([payload], "flattened_bucket", "ipc-1"))
        parent.send("done")
    finally:
        sender.join(timeout=60)
    assert count > 0 and engine.weight_version == "ipc-1"
    prompts = [[5, 6, 7], [8, 9]]
    snaps = _run(engine, loop, prompts, 1.0, 24, seed=3)
    _check_against(_hf(other_model_dir), prompts, snaps, 1.0)

    kv = engine.scheduler.kv
    engine_bytes = sum(t.numel() * t.element_size() for t in (kv.k, kv.v, *engine.model.tensors()))
    before = torch.cuda.memory_allocated()
    loop.run_until_complete(engine.release_memory(None))
    del kv
    freed = before - torch.cuda.memory_allocated()
    assert freed >= engine_bytes, (freed, engine_bytes)
    loop.run_until_complete(engine.resume_memory(None))
    again = _run(engine, loop, prompts, 1.0, 24, seed=3)
    assert [s.output_ids for s in again] == [s.output_ids for s in snaps]
    assert [s.output_logprobs for s in again] == [s.output_logprobs for s in snaps]
