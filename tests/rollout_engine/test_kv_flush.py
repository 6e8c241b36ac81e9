"""``/flush_cache`` zeroes only the part of the KV cache that was written since the last flush, and that part covers
every write: after a flush of an engine that served chunked, shared, long and short prompts the cache is all zeros,
and the outputs after it are those of a fresh engine."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from services.core.wire import SamplingParams
from services.rollout_engine.engine import BuiltinEngine, EngineSettings
from services.rollout_engine.requests import GenerationParams


@pytest.fixture
def cpu_engine(tiny_model_dir: Path):
    engine = BuiltinEngine(
        EngineSettings(model_path=str(tiny_model_dir), device="cpu", dtype="float32", chunked_prefill_size=16)
    )
    engine.start()
    yield engine
    engine.stop()


def _serve(
    engine: BuiltinEngine, prompts: list[list[int]], new_tokens: list[int], tag: str
) -> list[list[int]]:
    async def one(i: int, prompt: list[int], n: int) -> list[int]:
        params = GenerationParams.from_wire(
            SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True), engine.vocab_size
        )
        last = None
        async for snap in engine.generate(f"{tag}-{i}", prompt, params):
            last = snap
        return list(last.output_ids)

    async def run() -> list[list[int]]:
        return await asyncio.gather(
            *(one(i, p, n) for i, (p, n) in enumerate(zip(prompts, new_tokens, strict=True)))
        )

    return asyncio.run(run())


def _workload() -> tuple[list[list[int]], list[int]]:
    group = [7, 8, 9, 10, 11]
    prompts = [group] * 4 + [list(range(20, 60)), [3], list(range(100, 112))]
    return prompts, [3, 3, 3, 3, 6, 12, 5]


def test_flush_zeroes_every_written_position_and_only_those(cpu_engine: BuiltinEngine) -> None:
    kv = cpu_engine.scheduler.kv
    prompts, new_tokens = _workload()
    first = _serve(cpu_engine, prompts, new_tokens, "a")
    assert kv.k.abs().sum() > 0 and 0 < kv.used_slots <= len(prompts)
    # The longest sequence is 40 prompt tokens + 6 new ones, the last of which is never fed back: 45 positions.
    assert kv.used_len == 45 < kv.context_len
    assert asyncio.run(cpu_engine.flush_cache())
    assert kv.k.abs().sum() == 0 and kv.v.abs().sum() == 0
    assert (kv.used_slots, kv.used_len) == (0, 0)

    # A stale inf where no one has written since is never read: outputs after the flush are the first ones.
    kv.k[:, -1, :, -1] = float("inf")
    assert _serve(cpu_engine, prompts, new_tokens, "b") == first


def test_reset_of_a_fresh_cache_touches_nothing(cpu_engine: BuiltinEngine) -> None:
    kv = cpu_engine.scheduler.kv
    assert (kv.used_slots, kv.used_len) == (0, 0)
    kv.touch(10**6, 10**6)
    assert (kv.used_slots, kv.used_len) == (kv.slots, kv.context_len)
    kv.k.fill_(1.0)
    kv.reset()
    assert torch.count_nonzero(kv.k) == 0
