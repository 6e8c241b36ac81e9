"""Data-parallel splits, micro-batching and packing."""

from __future__ import annotations

import pytest
import torch

from trainer.data_packing import (
    first_fit_bins,
    fixed_micro_batches,
    karmarkar_karp,
    pack_sequences,
    pack_shared_prompts,
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


def test_shared_prompt_packing_stores_each_prompt_once():
    # Two samples of prompt [1, 2, 3], one of prompt [9], one more of [1, 2, 3]: the group's prompt comes first, then
    # its responses; the lone sample is packed whole.
    tokens = [[1, 2, 3, 10, 11], [1, 2, 3, 20], [9, 30, 31], [1, 2, 3, 40, 41, 42]]
    responses = [2, 1, 2, 3]
    packed = pack_shared_prompts(tokens, responses)
    assert packed.input_ids.tolist() == [[1, 2, 3, 10, 11, 20, 40, 41, 42, 9, 30, 31]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 4, 3, 3, 4, 5, 0, 1, 2]]
    assert packed.segments == ((0, 3, 0, 0), (3, 2, 0, 3), (5, 1, 0, 3), (6, 3, 0, 3), (9, 3, 9, 0))
    assert [r.tolist() for r in packed.response_rows] == [[2, 3], [2], [9, 10], [2, 6, 7]]
    assert packed.total_lengths == [5, 4, 3, 6]
    # Every response token is predicted by a row holding the token just before it in its own sequence.
    ids = packed.input_ids[0]
    for seq, response, rows in zip(tokens, responses, packed.response_rows, strict=True):
        assert ids[rows].tolist() == seq[len(seq) - response - 1 : -1]


def test_shared_prompt_packing_of_unrelated_samples_is_plain_packing():
    tokens, responses = [[7, 8, 9], [4, 5]], [1, 1]
    shared, plain = pack_shared_prompts(tokens, responses), pack_sequences(tokens, response_lengths=responses)
    assert shared.input_ids.tolist() == plain.input_ids.tolist()
    assert shared.position_ids.tolist() == plain.position_ids.tolist()
    assert shared.segments == plain.segments == ((0, 3, 0, 0), (3, 2, 3, 0))
    assert (
        [r.tolist() for r in shared.response_rows] == [r.tolist() for r in plain.response_rows] == [[1], [3]]
    )


def test_packing_names_a_response_longer_than_its_sequence():
    with pytest.raises(
        ValueError, match="response length 3 leaves no prompt token in a sequence of 3 tokens"
    ):
        pack_shared_prompts([[1, 2, 3]], [3])
    with pytest.raises(ValueError, match="response length 3 leaves no prompt token"):
        pack_sequences([[1, 2, 3]], response_lengths=[3])
