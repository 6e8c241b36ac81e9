"""CUDA graphs for the decode step: on a GPU a small model's decode step is dominated by kernel launches.

One graph per (batch bucket, cached-length bucket), captured the first time that shape is needed. Inputs go
through static buffers; padded rows use free KV slots (in a decode-only step, slots past the running batch hold
no live data) and attend to position 0 only.
"""

from __future__ import annotations

import logging

import torch

from services.rollout_engine.model import CausalLM, ForwardBatch, KVCache

logger = logging.getLogger(__name__)

_BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 80, 96, 128, 160, 192, 256, 384, 512)


def _length_buckets(context_len: int) -> list[int]:
    buckets, length = [], 128
    while length < context_len:
        buckets.append(length)
        length *= 2
    return [*buckets, context_len]


class DecodeGraphs:
    """Captured decode steps keyed by padded shape; invalid once the KV cache or weight storage is replaced."""

    def __init__(self, model: CausalLM, max_batch: int, context_len: int):
        self.model = model
        self.batch_buckets = sorted({b for b in _BATCH_BUCKETS if b < max_batch} | {max_batch})
        self.length_buckets = _length_buckets(context_len)
        device = model.device
        # Row 0: token ids, row 1: positions; one host-to-device copy per step.
        self.host = torch.zeros(2, max_batch, dtype=torch.long, pin_memory=True)
        self.inputs = torch.zeros(2, max_batch, dtype=torch.long, device=device)
        self.key_pos = torch.arange(context_len, device=device)
        self.rows = torch.arange(max_batch, device=device)
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None
        self._kv: KVCache | None = None

    def supports(self, batch: int) -> bool:
        return batch <= self.batch_buckets[-1]

    def clear(self) -> None:
        self._graphs.clear()
        self._pool = None
        self._kv = None

    def run(self, input_ids: list[int], positions: list[int], kv: KVCache) -> torch.Tensor:
        """Logits ``[len(input_ids), vocab]`` of one decode step for running rows ``0..n-1``."""
        if kv is not self._kv:
            self.clear()
            self._kv = kv
        n = len(input_ids)
        bs = next(b for b in self.batch_buckets if b >= n)
        cap = next(t for t in self.length_buckets if t > max(positions))
        # The host copy must not be rewritten while the previous step's transfer may still read it.
        torch.cuda.current_stream().synchronize()
        self.host[:, :n] = torch.tensor([input_ids, positions])
        self.host[:, n:bs] = 0
        self.inputs[:, :bs].copy_(self.host[:, :bs], non_blocking=True)
        key = (bs, cap)
        if key not in self._graphs:
            self._graphs[key] = self._capture(bs, cap, kv)
        graph, logits = self._graphs[key]
        graph.replay()
        return logits[:n]

    def _forward(self, bs: int, cap: int, kv: KVCache) -> torch.Tensor:
        positions = self.inputs[1, :bs]
        # Padded rows sit at position 0 of free slots and attend to that one key.
        mask = torch.where(self.key_pos[:cap].unsqueeze(0) <= positions.unsqueeze(1), 0.0, float("-inf"))
        batch = ForwardBatch(
            input_ids=self.inputs[0, :bs],
            positions=positions,
            num_decode=bs,
            decode_len=cap,
            decode_mask=mask,
        )
        return self.model.forward(batch, kv, self.rows[:bs])

    def _capture(self, bs: int, cap: int, kv: KVCache) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # Warm-up on a side stream, as CUDA graph capture requires; it computes exactly what the replay will.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._forward(bs, cap, kv)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self._forward(bs, cap, kv)
        self._pool = graph.pool()
        logger.debug("captured decode graph batch=%d len=%d", bs, cap)
        return graph, logits
