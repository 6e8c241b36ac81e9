"""Packed rows: every sequence of a packed row gets the logits and gradients of its own unpacked forward pass,
whether or not other sequences of the row share its length (those share one attention call)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from trainer.algorithms.logprobs import response_log_probs
from trainer.backends.torch_backend import model as model_lib
from trainer.backends.torch_backend.model import forward_logits, load_policy
from trainer.data_packing import PackedBatch, pack_sequences, pack_shared_prompts

MODEL = Path(__file__).resolve().parents[2] / "examples" / "quickstart" / "model"


@pytest.fixture(params=["blocks", "row-mask", "gathered"], autouse=True)
def attention_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test runs with short rows attended in one masked call over their stacked blocks, with one row-wide
    mask (what a one-block row gets), and with the gathered per-length calls that longer rows use."""
    if request.param == "row-mask":
        monkeypatch.setattr(model_lib, "_block_plan", lambda segments, device: None)
    if request.param == "gathered":
        monkeypatch.setattr(model_lib, "DENSE_ROW_TOKENS", 0)
    return request.param


@pytest.fixture(scope="module")
def policy() -> torch.nn.Module:
    torch.manual_seed(0)
    return load_policy(str(MODEL), dtype=torch.float32, device=torch.device("cpu"))


def _row(lengths: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 250, (1, sum(lengths)), generator=generator)
    positions = torch.cat([torch.arange(length) for length in lengths])[None]
    bounds = [0]
    for length in lengths:
        bounds.append(bounds[-1] + length)
    return ids, positions, tuple(bounds)


@pytest.mark.parametrize(
    "lengths",
    [[7, 7, 7, 7], [5, 9, 5, 12, 9, 5], [11], [3, 20]],
    ids=["one-length", "mixed-with-repeats", "single", "all-different"],
)
def test_packed_row_equals_each_sequence_alone(policy: torch.nn.Module, lengths: list[int]) -> None:
    ids, positions, bounds = _row(lengths, seed=len(lengths))
    policy.zero_grad()
    packed = policy(input_ids=ids, position_ids=positions, packed_seq_bounds=bounds).logits[0]
    packed.pow(2).mean().backward()
    packed_grads = [p.grad.clone() for p in policy.parameters()]
    policy.zero_grad()

    alone_loss = torch.zeros(())
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        logits = policy(input_ids=ids[:, start:end], position_ids=positions[:, start:end]).logits[0]
        # Float32 GEMMs over T rows and over L rows round differently (~1e-5); leaking attention would be O(1).
        torch.testing.assert_close(packed[start:end], logits, rtol=1e-4, atol=1e-4)
        alone_loss = alone_loss + logits.pow(2).sum()
    (alone_loss / packed.numel()).backward()
    for packed_grad, param in zip(packed_grads, policy.parameters(), strict=True):
        torch.testing.assert_close(packed_grad, param.grad, rtol=1e-3, atol=1e-5)
    policy.zero_grad()


def test_sequences_attend_only_to_themselves(policy: torch.nn.Module) -> None:
    ids, positions, bounds = _row([6, 6, 6], seed=3)
    with torch.no_grad():
        before = policy(input_ids=ids, position_ids=positions, packed_seq_bounds=bounds).logits[0]
        changed = ids.clone()
        changed[0, 6:12] = (changed[0, 6:12] + 1) % 250  # the middle sequence only
        after = policy(input_ids=changed, position_ids=positions, packed_seq_bounds=bounds).logits[0]
    assert torch.equal(before[:6], after[:6])
    assert torch.equal(before[12:], after[12:])
    assert not torch.equal(before[6:12], after[6:12])


def test_packed_row_under_bf16_autocast(policy: torch.nn.Module) -> None:
    ids, positions, bounds = _row([5, 9, 5], seed=7)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        packed = policy(input_ids=ids, position_ids=positions, packed_seq_bounds=bounds).logits[0]
        alone = policy(input_ids=ids[:, 5:14], position_ids=positions[:, 5:14]).logits[0]
    assert packed.dtype == alone.dtype
    torch.testing.assert_close(packed[5:14].float(), alone.float(), rtol=0.05, atol=0.05)


def test_cpu_autocast_attends_in_float32(policy: torch.nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under CPU bf16 autocast the packed attention calls SDPA in float32 (CPU's bf16 flash backward is several
    times slower than its float32 one) and hands bf16 back to the bf16 output projection."""
    import torch.nn.functional as F

    seen: list[tuple[torch.dtype, bool]] = []
    sdpa = F.scaled_dot_product_attention

    def spy(query, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003 - SDPA's signature
        seen.append((query.dtype, torch.is_autocast_enabled("cpu")))
        return sdpa(query, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    ids, positions, bounds = _row([5, 9, 5], seed=7)
    policy.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = policy(input_ids=ids, position_ids=positions, packed_seq_bounds=bounds).logits[0]
    logits.float().pow(2).mean().backward()
    assert seen and set(seen) == {(torch.float32, False)}
    assert logits.dtype == torch.bfloat16
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in policy.parameters())
    policy.zero_grad()


def _grouped_samples(seed: int) -> tuple[list[list[int]], list[int]]:
    """Three groups of samples sharing a prompt (responses of several lengths) and one sample alone."""
    generator = torch.Generator().manual_seed(seed)

    def draw(n: int) -> list[int]:
        return torch.randint(0, 250, (n,), generator=generator).tolist()

    tokens, responses = [], []
    for prompt_len, response_lens in ((9, [4, 4, 2, 6]), (5, [3, 1]), (9, [5, 5, 5])):
        prompt = draw(prompt_len)
        for r in response_lens:
            tokens.append(prompt + draw(r))
            responses.append(r)
    tokens.insert(3, draw(8))
    responses.insert(3, 3)
    return tokens, responses


def _response_log_probs(policy, packed: PackedBatch, tokens, responses) -> list[torch.Tensor]:
    logits = forward_logits(policy, packed)
    targets = [torch.tensor(seq) for seq in tokens]
    return response_log_probs(logits, packed.response_rows, targets, responses)[0]


def test_shared_prompts_give_each_sample_its_own_log_probs_and_gradients(policy: torch.nn.Module) -> None:
    tokens, responses = _grouped_samples(seed=11)
    shared = pack_shared_prompts(tokens, responses)
    plain = pack_sequences(tokens, response_lengths=responses)
    assert shared.num_tokens < plain.num_tokens

    def loss_and_grads(packed: PackedBatch) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        policy.zero_grad()
        log_probs = _response_log_probs(policy, packed, tokens, responses)
        # Weights differ per sample, so a response mixed into another's gradient would show.
        sum((k + 1) * lp.sum() for k, lp in enumerate(log_probs)).backward()
        grads = [p.grad.clone() for p in policy.parameters()]
        policy.zero_grad()
        return [lp.detach() for lp in log_probs], grads

    shared_lps, shared_grads = loss_and_grads(shared)
    plain_lps, plain_grads = loss_and_grads(plain)
    for got, want in zip(shared_lps, plain_lps, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for got, want in zip(shared_grads, plain_grads, strict=True):
        # Relative to each gradient's norm: the float32 sums over a group's responses run in another order
        # (~1e-6 here); a response attending to the wrong tokens would be off by O(1).
        assert float((got - want).norm() / want.norm()) < 1e-4


def test_a_shared_prompt_response_sees_only_its_prompt_and_itself(policy: torch.nn.Module) -> None:
    tokens, responses = _grouped_samples(seed=5)
    with torch.no_grad():
        before = _response_log_probs(policy, pack_shared_prompts(tokens, responses), tokens, responses)
        changed = [list(seq) for seq in tokens]
        changed[1][-1] = (changed[1][-1] + 1) % 250  # the last token of the second sample's response only
        after = _response_log_probs(policy, pack_shared_prompts(changed, responses), changed, responses)
    for k, (b, a) in enumerate(zip(before, after, strict=True)):
        if k == 1:
            assert torch.equal(b[:-1], a[:-1]) and not torch.equal(b[-1], a[-1])
        else:
            assert torch.equal(b, a), k
