"""CUDA graphs for the decode step: on a GPU a small model's decode step is dominated by kernel launches.

One graph per (batch bucket, cached-length bucket), captured the first time that shape is needed. Inputs go
through static buffers; padded rows use free KV slots (slots past the running batch hold no live data, since
prompts are prefilled into per-sequence staging buffers) and attend to position 0 only.
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
        self.ids = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.pos = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.mask = torch.zeros(max_batch, context_len, dtype=torch.float32, device=device)
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

    def run(self, batch: ForwardBatch, kv: KVCache) -> torch.Tensor:
        if kv is not self._kv:
            self.clear()
            self._kv = kv
        n, length = batch.num_decode, batch.decode_len
        bs = next(b for b in self.batch_buckets if b >= n)
        cap = next(t for t in self.length_buckets if t >= length)
        self.ids[:n].copy_(batch.input_ids[:n])
        self.pos[:n].copy_(batch.positions[:n])
        self.mask[:n, :length].copy_(batch.decode_mask.view(n, length))
        self.mask[:n, length:cap].fill_(float("-inf"))
        if bs > n:
            self.ids[n:bs].zero_()
            self.pos[n:bs].zero_()
            self.mask[n:bs, :cap].fill_(float("-inf"))
            self.mask[n:bs, 0].zero_()
        key = (bs, cap)
        if key not in self._graphs:
            self._graphs[key] = self._capture(bs, cap, kv)
        graph, logits = self._graphs[key]
        graph.replay()
        return logits[:n]

    def _capture(self, bs: int, cap: int, kv: KVCache) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        static = ForwardBatch(
            input_ids=self.ids[:bs],
            positions=self.pos[:bs],
            num_decode=bs,
            decode_len=cap,
            decode_mask=self.mask[:bs, :cap].view(bs, 1, 1, cap),
        )
        rows = self.rows[:bs]
        # Warm-up on a side stream, as CUDA graph capture requires; it computes exactly what the replay will.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self.model.forward(static, kv, rows)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self.model.forward(static, kv, rows)
        self._pool = graph.pool()
        logger.debug("captured decode graph batch=%d len=%d", bs, cap)
        return graph, logits
