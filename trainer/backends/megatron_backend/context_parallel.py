"""Context parallelism (``--context-parallel-size``) for the Megatron backend's packed rows, without
TransformerEngine.

Every sequence of a packed row is padded to a multiple of ``2C`` tokens and cut into ``2C`` equal chunks;
context-parallel rank ``r`` holds chunks ``r`` and ``2C - 1 - r`` of each sequence (the load-balanced split Megatron
and TransformerEngine use: with causal attention every rank then does about the same work). The layers run on the
local tokens only. Attention all-gathers keys and values over the context-parallel group (their gradients are
reduce-scattered back) and attends each local chunk to its sequence's keys up to the chunk's last position,
causally; rotary embeddings take each token's position in its sequence. Per-token results (log-probs, entropies,
values, MoE routes) are all-gathered and put back in row order, so everything after the model sees the row as one
rank would.

Plain torch: no megatron-core import, so the split and the attention are tested on CPU processes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right


@dataclass(frozen=True)
class Chunk:
    """One local chunk of a sequence: local rows ``[local_start, local_start + length)`` attend to the padded row's
    keys ``[key_start, key_end)`` (their sequence up to the chunk's last token), lower-right causal."""

    local_start: int
    length: int
    key_start: int
    key_end: int


@dataclass
class RowSplit:
    """One packed row split over the context-parallel group, as this rank sees it.

    The *padded row* is the row with each sequence padded at its end to a multiple of ``2C`` tokens, plus a filler
    sequence (attended to by nothing else) when the local length must divide by ``multiple``.
    """

    cp_size: int
    cp_rank: int
    group: Any
    num_tokens: int  # tokens of the row before padding
    padded_lengths: list[int]  # per sequence of the padded row (the filler last, if any)
    local_index: torch.Tensor  # [T_local] each local token's index in the padded row
    positions: torch.Tensor  # [T_local] each local token's position in its sequence
    gather_order: (
        torch.Tensor
    )  # [T_padded] rank-major concatenation of every rank's local tokens → padded row
    token_index: torch.Tensor  # [num_tokens] each original token's index in the padded row
    chunks: list[Chunk] = field(default_factory=list)

    @property
    def local_tokens(self) -> int:
        return int(self.local_index.numel())

    @property
    def padded_tokens(self) -> int:
        return int(self.gather_order.numel())


def _local_indices(starts: list[int], lengths: list[int], cp_size: int, rank: int) -> list[int]:
    out: list[int] = []
    for start, length in zip(starts, lengths, strict=True):
        chunk = length // (2 * cp_size)
        for j in (rank, 2 * cp_size - 1 - rank):
            out.extend(range(start + j * chunk, start + (j + 1) * chunk))
    return out


def split_row(
    lengths: list[int],
    *,
    cp_size: int,
    cp_rank: int,
    group: Any = None,
    multiple: int = 1,
    device: torch.device | str = "cpu",
) -> RowSplit:
    """This rank's share of a packed row of sequences of ``lengths`` tokens (see :class:`RowSplit`); the local
    length divides by ``multiple`` (the tensor-parallel size under sequence parallelism)."""
    if cp_size < 1 or not 0 <= cp_rank < cp_size:
        raise ValueError(f"context-parallel rank {cp_rank} of {cp_size} is out of range")
    if not lengths or min(lengths) < 1:
        raise ValueError(f"a packed row needs sequences of at least one token, got lengths {lengths}")
    unit = 2 * cp_size
    padded = [-(-n // unit) * unit for n in lengths]
    # A filler of 2C·m tokens adds 2m local tokens per rank: the least m that makes the local length divide.
    local = sum(padded) // cp_size
    for m in range(multiple):
        if (local + 2 * m) % multiple == 0:
            if m:
                padded.append(unit * m)
            break
    else:
        raise ValueError(
            f"no filler makes {local} local tokens a multiple of {multiple} under context parallelism {cp_size}"
        )
    starts = [0]
    for n in padded[:-1]:
        starts.append(starts[-1] + n)
    per_rank = [_local_indices(starts, padded, cp_size, r) for r in range(cp_size)]
    mine = per_rank[cp_rank]
    concatenated = torch.tensor([i for part in per_rank for i in part], dtype=torch.long)
    gather_order = torch.empty_like(concatenated)
    gather_order[concatenated] = torch.arange(concatenated.numel())
    token_index = torch.cat(
        [torch.arange(s, s + n, dtype=torch.long) for s, n in zip(starts, lengths, strict=False)]
    )
    positions: list[int] = []
    chunks: list[Chunk] = []
    local_start = 0
    for start, length in zip(starts, padded, strict=True):
        chunk = length // unit
        for j in (cp_rank, unit - 1 - cp_rank):
            positions.extend(range(j * chunk, (j + 1) * chunk))
            chunks.append(Chunk(local_start, chunk, start, start + (j + 1) * chunk))
            local_start += chunk
    return RowSplit(
        cp_size=cp_size,
        cp_rank=cp_rank,
        group=group,
        num_tokens=sum(lengths),
        padded_lengths=padded,
        local_index=torch.tensor(mine, dtype=torch.long, device=device),
        positions=torch.tensor(positions, dtype=torch.long, device=device),
        gather_order=gather_order.to(device),
        token_index=token_index.to(device),
        chunks=chunks,
    )


def local_part(row: torch.Tensor, split: RowSplit, fill: int = 0) -> torch.Tensor:
    """This rank's tokens of a per-token tensor ``row`` ``[num_tokens, ...]`` (padding positions take ``fill``)."""
    padded = row.new_full((split.padded_tokens, *row.shape[1:]), fill)
    padded[split.token_index] = row
    return padded[split.local_index]


def _all_gather(tensor: torch.Tensor, group: Any) -> torch.Tensor:
    """Every rank's ``tensor`` concatenated along dim 0, rank-major."""
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts)


class _GatherKV(torch.autograd.Function):
    """All-gather along dim 0; the backward sums every rank's gradient of this rank's part (each rank's queries
    attend to every rank's keys)."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        return _all_gather(tensor, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        group = ctx.group
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        grad = grad.contiguous()
        if dist.get_backend(group) == "nccl":
            out = grad.new_empty((grad.shape[0] // size, *grad.shape[1:]))
            dist.reduce_scatter_tensor(out, grad, group=group)
            return out, None
        dist.all_reduce(grad, group=group)  # gloo has no reduce-scatter
        return grad.chunk(size)[rank].clone(), None


class _GatherRows(torch.autograd.Function):
    """Per-token values of every rank in padded-row order. Every rank computes the same loss from them, so the
    backward keeps this rank's tokens' gradients and sums nothing."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, split: RowSplit) -> torch.Tensor:
        ctx.split = split
        return _all_gather(tensor, split.group).index_select(0, split.gather_order)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad.index_select(0, ctx.split.local_index), None


def gather_rows(local: torch.Tensor, split: RowSplit) -> torch.Tensor:
    """Per-token values ``[T_local, ...]`` of every context-parallel rank → ``[num_tokens, ...]`` in the original
    row order (padding dropped). Differentiable for a loss every rank computes alike."""
    return _GatherRows.apply(local, split).index_select(0, split.token_index)


def rotate_half(t: torch.Tensor) -> torch.Tensor:
    first, second = t.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``t`` ``[T, heads, dim]`` with per-token angles ``freqs`` ``[T, rot_dim]`` (non-interleaved
    halves, the arithmetic of megatron-core's unfused RoPE: cos and sin cast to ``t``'s dtype)."""
    freqs = freqs[:, None, :]
    rot = freqs.shape[-1]
    head, tail = t[..., :rot], t[..., rot:]
    head = head * torch.cos(freqs).to(t.dtype) + rotate_half(head) * torch.sin(freqs).to(t.dtype)
    return torch.cat((head, tail), dim=-1) if tail.numel() else head


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    split: RowSplit,
    *,
    scale: float,
) -> torch.Tensor:
    """Causal attention of this rank's tokens ``[T_local, heads, dim]`` (rotary embeddings applied) over their whole
    sequences: keys and values all-gathered over the context-parallel group. Returns ``[T_local, heads, dim]``."""
    full_key = _GatherKV.apply(key, split.group).index_select(0, split.gather_order)
    full_value = _GatherKV.apply(value, split.group).index_select(0, split.gather_order)
    group_size = query.shape[1] // full_key.shape[1]
    if group_size > 1:
        # Explicit heads: the lower-right causal kernels take no grouped-query layout.
        full_key = full_key.repeat_interleave(group_size, dim=1)
        full_value = full_value.repeat_interleave(group_size, dim=1)
    parts = []
    for c in split.chunks:
        # [n, heads, dim] -> [1, heads, n, dim]
        q = query[c.local_start : c.local_start + c.length].permute(1, 0, 2).unsqueeze(0)
        k = full_key[c.key_start : c.key_end].permute(1, 0, 2).unsqueeze(0)
        v = full_value[c.key_start : c.key_end].permute(1, 0, 2).unsqueeze(0)
        mask = causal_lower_right(c.length, c.key_end - c.key_start)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        parts.append(out[0].permute(1, 0, 2))
    return torch.cat(parts)
