"""Context parallelism's row split and attention (``trainer/backends/megatron_backend/context_parallel.py``), on CPU
processes talking over gloo: every rank's share of a packed row, attended with all-gathered keys and values and
gathered back, gives the outputs and the gradients of whole-sequence causal attention."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from trainer.backends.megatron_backend import context_parallel as cp


def _padded_to_original(split: cp.RowSplit) -> torch.Tensor:
    out = torch.full((split.padded_tokens,), -1, dtype=torch.long)
    out[split.token_index] = torch.arange(split.num_tokens)
    return out


@pytest.mark.parametrize("cp_size", [1, 2, 3])
@pytest.mark.parametrize("multiple", [1, 2, 4])
def test_split_covers_every_token_once_in_balanced_chunks(cp_size, multiple):
    lengths = [5, 9, 1, 12, 6]
    splits = [cp.split_row(lengths, cp_size=cp_size, cp_rank=r, multiple=multiple) for r in range(cp_size)]
    padded = splits[0].padded_tokens
    every = torch.cat([s.local_index for s in splits])
    assert sorted(every.tolist()) == list(range(padded))
    # The rank-major concatenation of the shares, reordered, is the padded row.
    assert torch.equal(every[splits[0].gather_order], torch.arange(padded))
    for split in splits:
        assert split.local_tokens == padded // cp_size
        assert split.local_tokens % multiple == 0
        assert all(n % (2 * cp_size) == 0 for n in split.padded_lengths)
        # Original tokens keep their order, each sequence starting a padded one.
        starts = [0]
        for n in split.padded_lengths[:-1]:
            starts.append(starts[-1] + n)
        expected = [i for s, n in zip(starts, lengths, strict=False) for i in range(s, s + n)]
        assert split.token_index.tolist() == expected
        # Chunks r and 2C-1-r of every sequence; positions count from each sequence's start.
        for k, start in enumerate(starts):
            chunk = split.padded_lengths[k] // (2 * cp_size)
            first, second = split.chunks[2 * k], split.chunks[2 * k + 1]
            assert first.key_end - start == (split.cp_rank + 1) * chunk
            assert second.key_end - start == (2 * cp_size - split.cp_rank) * chunk
            assert first.key_start == second.key_start == start
            rows = split.positions[first.local_start : first.local_start + first.length].tolist()
            assert rows == list(range(split.cp_rank * chunk, (split.cp_rank + 1) * chunk))
    if multiple == 1:
        unit = 2 * cp_size
        assert splits[0].padded_lengths == [-(-n // unit) * unit for n in lengths]


def test_split_without_context_parallelism_pads_only_for_the_multiple():
    split = cp.split_row([3, 4], cp_size=1, cp_rank=0, multiple=4)
    assert split.padded_lengths == [4, 4]  # each sequence to 2 tokens, no filler needed
    split = cp.split_row([2, 2, 2], cp_size=2, cp_rank=1, multiple=4)
    assert split.padded_lengths == [4, 4, 4, 4]  # 6 local tokens → one 4-token filler → 8
    assert split.local_tokens == 8


def test_bad_split_arguments_are_named():
    with pytest.raises(ValueError, match="context-parallel rank 2 of 2"):
        cp.split_row([4], cp_size=2, cp_rank=2)
    with pytest.raises(ValueError, match="at least one token"):
        cp.split_row([4, 0], cp_size=2, cp_rank=0)


def test_local_part_takes_this_ranks_tokens_with_padding_filled():
    lengths = [3, 5]
    row = torch.arange(1, 9)
    split = cp.split_row(lengths, cp_size=2, cp_rank=1)
    original = _padded_to_original(split)[split.local_index]
    expected = torch.where(original >= 0, row[original.clamp(min=0)], torch.zeros_like(original))
    assert torch.equal(cp.local_part(row, split), expected)


def _angles(positions: torch.Tensor, dim: int) -> torch.Tensor:
    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    freqs = torch.outer(positions.double(), inv)
    return torch.cat((freqs, freqs), dim=-1)


def _reference(q, k, v, lengths, scale):
    """Whole-sequence rotary embeddings and causal attention, one sequence at a time."""
    out, start = [], 0
    for n in lengths:
        pos = torch.arange(n)
        qs = cp.apply_rotary(q[start : start + n], _angles(pos, q.shape[-1]))
        ks = cp.apply_rotary(k[start : start + n], _angles(pos, k.shape[-1]))
        o = F.scaled_dot_product_attention(
            qs.permute(1, 0, 2)[None],
            ks.permute(1, 0, 2)[None],
            v[start : start + n].permute(1, 0, 2)[None],
            is_causal=True,
            scale=scale,
            enable_gqa=True,
        )
        out.append(o[0].permute(1, 0, 2))
        start += n
    return torch.cat(out)


def _rank(rank: int, world: int, port: int, multiple: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        lengths = [5, 9, 1, 12, 6, 2]
        total, heads, kv_heads, dim = sum(lengths), 4, 2, 8
        q = torch.randn(total, heads, dim, dtype=torch.float64, requires_grad=True)
        k = torch.randn(total, kv_heads, dim, dtype=torch.float64, requires_grad=True)
        v = torch.randn(total, kv_heads, dim, dtype=torch.float64, requires_grad=True)
        weight = torch.randn(total, heads, dim, dtype=torch.float64)
        scale = dim**-0.5
        reference = _reference(q, k, v, lengths, scale)
        (reference * weight).sum().backward()

        split = cp.split_row(lengths, cp_size=world, cp_rank=rank, group=dist.group.WORLD, multiple=multiple)
        ql, kl, vl = (cp.local_part(t.detach(), split).requires_grad_() for t in (q, k, v))
        angles = _angles(split.positions, dim)
        out = cp.attention(cp.apply_rotary(ql, angles), cp.apply_rotary(kl, angles), vl, split, scale=scale)
        gathered = cp.gather_rows(out, split)
        torch.testing.assert_close(gathered, reference.detach(), rtol=1e-10, atol=1e-10)
        (gathered * weight).sum().backward()

        original = _padded_to_original(split)[split.local_index]
        real = original >= 0
        for local, full in ((ql, q), (kl, k), (vl, v)):
            torch.testing.assert_close(local.grad[real], full.grad[original[real]], rtol=1e-10, atol=1e-10)
            assert torch.count_nonzero(local.grad[~real]) == 0
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(("world", "multiple"), [(2, 1), (3, 1), (2, 4)])
def test_context_parallel_attention_equals_whole_sequence_attention(world, multiple):
    """Outputs, and the gradients of queries, keys and values, of every rank's tokens (float64, 1e-10)."""
    mp.spawn(_rank, args=(world, _free_port(), multiple), nprocs=world, join=True)
