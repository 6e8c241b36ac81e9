"""How a rollout's samples are split: over data-parallel ranks (``--balance-data``), into optimizer steps, and into
micro-batches (fixed ``--micro-batch-size`` or token-budgeted ``--use-dynamic-batch-size``), plus sequence packing.

Balanced splits use the Karmarkar–Karp largest-differencing method, which keeps the heaviest and lightest
partitions close (on token counts) far better than round-robin when lengths vary.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass(order=True)
class _KKState:
    # heapq is a min-heap: the negated spread pops the most unbalanced state first.
    sort_key: tuple[float, int]
    partitions: list[list[int]] = field(compare=False)
    sums: list[float] = field(compare=False)


def karmarkar_karp(weights: Sequence[float], k: int, *, equal_size: bool = False) -> list[list[int]]:
    """Split item indices into ``k`` partitions with near-equal weight sums (largest differencing method).

    With ``equal_size`` every partition gets exactly ``len(weights) / k`` items (which must divide). Each partition
    is returned sorted, and partitions are ordered by their smallest index, so the result is deterministic.
    """
    n = len(weights)
    if k < 1:
        raise ValueError(f"cannot split into {k} partitions")
    if equal_size and n % k:
        raise ValueError(f"{n} items do not split into {k} equal partitions")
    order = sorted(range(n), key=lambda i: (weights[i], i))
    heap: list[_KKState] = []
    counter = 0

    def push(partitions: list[list[int]], sums: list[float]) -> None:
        nonlocal counter
        heapq.heappush(heap, _KKState((-(max(sums) - min(sums)), counter), partitions, sums))
        counter += 1

    if equal_size:
        for start in range(0, n, k):
            chunk = order[start : start + k]
            push([[i] for i in chunk], [float(weights[i]) for i in chunk])
    else:
        for i in order:
            push([[i]] + [[] for _ in range(k - 1)], [float(weights[i])] + [0.0] * (k - 1))
    if not heap:
        return [[] for _ in range(k)]
    while len(heap) > 1:
        a, b = heapq.heappop(heap), heapq.heappop(heap)
        a_order = sorted(range(k), key=lambda j: a.sums[j], reverse=True)
        b_order = sorted(range(k), key=lambda j: b.sums[j])
        partitions = [a.partitions[x] + b.partitions[y] for x, y in zip(a_order, b_order, strict=True)]
        sums = [a.sums[x] + b.sums[y] for x, y in zip(a_order, b_order, strict=True)]
        push(partitions, sums)
    result = [sorted(p) for p in heap[0].partitions]
    return sorted(result, key=lambda p: p[0] if p else n)


def partition_for_dp(
    lengths: Sequence[int], dp_size: int, *, balance: bool, group_size: int = 1
) -> list[list[int]]:
    """Sample indices each data-parallel rank trains on.

    Without ``balance`` rank r takes samples r, r + dp, r + 2·dp, … (slime's strided split). With ``balance``
    (``--balance-data``) whole groups of ``group_size`` adjacent samples (one prompt's samples) are assigned so
    that every rank gets the same number of groups and near-equal total tokens.
    """
    n = len(lengths)
    if not balance:
        return [list(range(rank, n, dp_size)) for rank in range(dp_size)]
    if n % group_size:
        raise ValueError(f"--balance-data: {n} samples are not whole groups of {group_size}")
    num_groups = n // group_size
    group_tokens = [sum(lengths[g * group_size : (g + 1) * group_size]) for g in range(num_groups)]
    if num_groups % dp_size:
        raise ValueError(
            f"--balance-data: {num_groups} prompt groups cannot be split evenly over {dp_size} data-parallel ranks"
        )
    parts = karmarkar_karp(group_tokens, dp_size, equal_size=True)
    return [[g * group_size + j for g in part for j in range(group_size)] for part in parts]


def first_fit_bins(lengths: Sequence[int], capacity: int) -> int:
    """How many bins of ``capacity`` tokens first-fit needs for ``lengths`` (a sample longer than the capacity gets
    a bin of its own)."""
    bins: list[int] = []
    for length in lengths:
        for j, used in enumerate(bins):
            if used + length <= capacity:
                bins[j] += length
                break
        else:
            bins.append(length)
    return len(bins)


def fixed_micro_batches(num_samples: int, micro_batch_size: int) -> list[list[int]]:
    """Contiguous micro-batches of ``micro_batch_size`` samples (the last may be shorter)."""
    return [
        list(range(s, min(s + micro_batch_size, num_samples)))
        for s in range(0, num_samples, micro_batch_size)
    ]


def dynamic_micro_batches(lengths: Sequence[int], num_micro_batches: int) -> list[list[int]]:
    """Split samples into ``num_micro_batches`` micro-batches with near-equal token counts."""
    return karmarkar_karp(lengths, num_micro_batches)


# A packed row's segment: (start, length, prefix_start, prefix_length). A segment attends causally to itself and,
# when prefix_length > 0, to all of the prefix segment at prefix_start before that (a shared prompt).
Segment = tuple[int, int, int, int]


@dataclass
class PackedBatch:
    """Samples concatenated into one row without padding, attended segment by segment (never across samples).

    ``position_ids`` restart at 0 for every sample (a shared prompt's continuations carry on from the prompt's
    length). ``segments`` tell the attention what attends to what; ``response_rows[k]``, when the response lengths
    were given, are the rows whose logits predict sample k's response tokens, in order.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    total_lengths: list[int]
    segments: tuple[Segment, ...] = ()
    response_rows: list[torch.Tensor] | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())


def _check_response(total: int, response: int) -> None:
    if not 0 <= response <= total - 1:
        raise ValueError(f"response length {response} leaves no prompt token in a sequence of {total} tokens")


def pack_sequences(
    tokens: Sequence[Sequence[int]],
    device: torch.device | str = "cpu",
    *,
    response_lengths: Sequence[int] | None = None,
) -> PackedBatch:
    """Pack token sequences into ``[1, Σ L_i]`` input ids and position ids, one segment per sequence."""
    if not tokens:
        raise ValueError("cannot pack an empty micro-batch")
    lengths = [len(t) for t in tokens]
    input_ids = torch.tensor(
        [tok for seq in tokens for tok in seq], dtype=torch.long, device=device
    ).unsqueeze(0)
    position_ids = torch.cat([torch.arange(n, dtype=torch.long, device=device) for n in lengths]).unsqueeze(0)
    segments, offsets = [], []
    offset = 0
    for length in lengths:
        if length:
            segments.append((offset, length, offset, 0))
        offsets.append(offset)
        offset += length
    rows = None
    if response_lengths is not None:
        rows = []
        for start, total, response in zip(offsets, lengths, response_lengths, strict=True):
            _check_response(total, response)
            rows.append(torch.arange(start + total - response - 1, start + total - 1, device=device))
    return PackedBatch(
        input_ids=input_ids,
        position_ids=position_ids,
        total_lengths=lengths,
        segments=tuple(segments),
        response_rows=rows,
    )


def pack_shared_prompts(
    tokens: Sequence[Sequence[int]],
    response_lengths: Sequence[int],
    device: torch.device | str = "cpu",
) -> PackedBatch:
    """Pack samples so that those with the same prompt (the tokens before their response: a GRPO group's
    samples) store and compute it once; each response then attends to the shared prompt and to itself.

    Every response token gets the logits it would get in its own sequence (same tokens, positions and causal
    context; only the float rounding of batched kernels differs), and since the prompt's activations feed every
    response of the group, backward sums the group's gradients through them once. A group of n samples with
    prompt P and responses R costs P + n·R tokens instead of n·(P + R). A sample whose prompt no other sample of
    the micro-batch shares is packed whole, as :func:`pack_sequences` does.
    """
    if not tokens:
        raise ValueError("cannot pack an empty micro-batch")
    groups: dict[tuple[int, ...], list[int]] = {}
    for k, (seq, response) in enumerate(zip(tokens, response_lengths, strict=True)):
        _check_response(len(seq), response)
        groups.setdefault(tuple(seq[: len(seq) - response]), []).append(k)
    ids: list[int] = []
    positions: list[int] = []
    segments: list[Segment] = []
    rows: list[torch.Tensor | None] = [None] * len(tokens)
    for prompt, members in groups.items():
        if len(members) == 1:
            (k,) = members
            seq, response, start = tokens[k], response_lengths[k], len(ids)
            segments.append((start, len(seq), start, 0))
            ids.extend(seq)
            positions.extend(range(len(seq)))
            rows[k] = torch.arange(start + len(seq) - response - 1, start + len(seq) - 1)
            continue
        prefix_start, prefix_length = len(ids), len(prompt)
        segments.append((prefix_start, prefix_length, prefix_start, 0))
        ids.extend(prompt)
        positions.extend(range(prefix_length))
        last_prompt_row = torch.tensor([prefix_start + prefix_length - 1])
        for k in members:
            response, start = response_lengths[k], len(ids)
            if response == 0:
                rows[k] = torch.zeros(0, dtype=torch.long)
                continue
            segments.append((start, response, prefix_start, prefix_length))
            ids.extend(tokens[k][prefix_length:])
            positions.extend(range(prefix_length, prefix_length + response))
            # The prompt's last row predicts the first response token; the response's own rows the rest.
            rows[k] = torch.cat([last_prompt_row, torch.arange(start, start + response - 1)])
    return PackedBatch(
        input_ids=torch.tensor(ids, dtype=torch.long, device=device).unsqueeze(0),
        position_ids=torch.tensor(positions, dtype=torch.long, device=device).unsqueeze(0),
        total_lengths=[len(t) for t in tokens],
        segments=tuple(segments),
        response_rows=[r.to(device) for r in rows],
    )
