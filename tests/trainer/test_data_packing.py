"""Data-parallel splits, micro-batching and packing."""

from __future__ import annotations

import pytest
import torch

from trainer.data_packing import (
    first_fit_bins,
    fixed_micro_batches,
    karmarkar_karp,
    pack_sequences,
    partition_for_dp,
)


def test_karmarkar_karp_balances_better_than_round_robin():
    weights = [10, 9, 8, 7, 6, 5, 4, 3]
    parts = karmarkar_karp(weights, 2, equal_size=True)
    sums = [sum(weights[i] for i in p) for p in parts]
    assert sorted(i for p in parts for i in p) == list(range(8))
    assert all(len(p) == 4 for p in parts)
    assert max(sums) - min(sums) == 0
    # round robin would give 10+8+6+4 = 28 vs 24
    unequal = karmarkar_karp([7, 1, 1, 1, 1, 1, 1, 1], 2)
    assert sorted(sum([7, 1, 1, 1, 1, 1, 1, 1][i] for i in p) for p in unequal) == [7, 7]


def test_karmarkar_karp_rejects_an_uneven_equal_split():
    with pytest.raises(ValueError, match="equal partitions"):
        karmarkar_karp([1, 2, 3], 2, equal_size=True)


def test_strided_split_matches_slime():
    assert partition_for_dp([5] * 6, 2, balance=False) == [[0, 2, 4], [1, 3, 5]]


def test_balanced_split_keeps_a_prompts_samples_together():
    lengths = [100, 100, 1, 1, 50, 50, 50, 50]
    parts = partition_for_dp(lengths, 2, balance=True, group_size=2)
    for part in parts:
        assert len(part) == 4
        for i in part:
            assert (i ^ 1) in part  # the other sample of the same prompt
    totals = sorted(sum(lengths[i] for i in p) for p in parts)
    assert totals == [200, 202]


def test_balanced_split_needs_whole_groups_per_rank():
    with pytest.raises(ValueError, match="--balance-data"):
        partition_for_dp([1] * 6, 2, balance=True, group_size=2)


def test_micro_batches():
    assert fixed_micro_batches(5, 2) == [[0, 1], [2, 3], [4]]
    assert first_fit_bins([6, 5, 4, 3, 2], 8) == 3
    assert first_fit_bins([20], 8) == 1


def test_packing_restarts_positions_per_sample():
    packed = pack_sequences([[7, 8, 9], [4, 5]])
    assert packed.input_ids.tolist() == [[7, 8, 9, 4, 5]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 0, 1]]
    assert packed.num_tokens == 5 and packed.total_lengths == [3, 2]
    assert packed.input_ids.dtype == torch.long
