"""Chat messages -> token ids and a loss mask that trains only on assistant turns (slime's
``MultiTurnLossMaskGenerator``, ``--loss-mask-type`` qwen / qwen3 / distill_qwen).

- ``qwen``: every message is templated on its own; the default system prompt the template adds to a lone
  non-system message is cut off (after the first message); an assistant message's tokens count except its
  header (``<|im_start|>assistant\\n``).
- ``qwen3``: the same, but every message is templated after a fixed user message whose tokens are then removed,
  so Qwen3's template renders assistant turns as it would mid-conversation (with the ``<think>`` block).
- ``distill_qwen``: the first message templated with the generation prompt (no loss) followed by the content
  of the last message (loss).

A message with ``step_loss_mask`` other than 1 contributes no loss. A tokenizer whose vocabulary has
``<｜Assistant｜>`` (DeepSeek-R1 distills) is treated as distill_qwen under ``qwen``, as slime does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

LOSS_MASK_TYPES = ("qwen", "qwen3", "distill_qwen")
_PROBE_TEXT = "FOR TESTING ONLY"
_QWEN3_PREFIX = {"role": "user", "content": "FOR CALCULATING LOSS MASK ONLY"}
_DISTILL_MARKER = "<｜Assistant｜>"

Message = Mapping[str, Any]


def response_length(loss_mask: Sequence[int]) -> int:
    """Tokens from the first trained token to the end (slime's get_response_lengths); 0 when nothing is trained."""
    for i, flag in enumerate(loss_mask):
        if flag == 1:
            return len(loss_mask) - i
    return 0


def _find_all(haystack: Sequence[int], needle: Sequence[int]) -> list[int]:
    n = len(needle)
    return [i for i in range(len(haystack) - n + 1) if list(haystack[i : i + n]) == list(needle)]


class MultiTurnLossMaskGenerator:
    """Token ids and loss mask of a conversation for one tokenizer and one ``--loss-mask-type``."""

    def __init__(self, tokenizer: Any, tokenizer_type: str = "qwen"):
        if tokenizer_type not in LOSS_MASK_TYPES:
            raise ValueError(
                f"--loss-mask-type must be one of {list(LOSS_MASK_TYPES)}, got {tokenizer_type!r}"
            )
        self.tokenizer = tokenizer
        self.tokenizer_type = tokenizer_type
        if tokenizer_type == "qwen" and _DISTILL_MARKER in tokenizer.get_added_vocab():
            self.tokenizer_type = "distill_qwen"
        self.system_message_length, self.gen_token_length = self._probe_template()

    def _template(self, messages: Sequence[Message], **kwargs: Any) -> list[int]:
        # return_dict=False: transformers 5 returns a BatchEncoding by default, whose len() is its key count.
        ids = self.tokenizer.apply_chat_template(
            [_plain(message) for message in messages], tokenize=True, return_dict=False, **kwargs
        )
        return list(ids)

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _probe_template(self) -> tuple[int, int]:
        """(tokens of the default system prompt a lone message gets, tokens of the assistant header).

        Two identical user messages are templated: the distance between the two copies of the text, less one
        message's own wrapping, is what the template adds only in front of the first message.
        """
        probe = [{"role": "user", "content": _PROBE_TEXT}, {"role": "user", "content": _PROBE_TEXT}]
        raw = self._encode(_PROBE_TEXT)
        text = self.tokenizer.apply_chat_template(probe, tokenize=False)
        ids = self._encode(text)
        found = _find_all(ids, raw)
        if len(found) != 2:
            raise ValueError(
                f"cannot measure the chat template of {type(self.tokenizer).__name__}: the probe text appears "
                f"{len(found)} times instead of 2 (--loss-mask-type {self.tokenizer_type} needs a chat template)"
            )
        first, second = found
        tail = len(ids) - len(raw) - second
        wrapping = (second - first) - tail - len(raw)
        with_prompt = self._template(probe, add_generation_prompt=True)
        return first - wrapping, len(with_prompt) - len(ids)

    def get_loss_mask(self, messages: Sequence[Message]) -> tuple[list[int], list[int]]:
        """(token ids, loss mask) of the whole conversation, both of the same length."""
        if not messages:
            raise ValueError("messages: a trajectory needs at least one message")
        if self.tokenizer_type == "distill_qwen":
            return self._distill_qwen(messages)
        return self._per_message(messages, prefixed=self.tokenizer_type == "qwen3")

    def _per_message(self, messages: Sequence[Message], *, prefixed: bool) -> tuple[list[int], list[int]]:
        prefix_ids = self._template([_QWEN3_PREFIX]) if prefixed else []
        token_ids: list[int] = []
        loss_mask: list[int] = []
        for i, message in enumerate(messages):
            if prefixed:
                ids = self._template([_QWEN3_PREFIX, message])[len(prefix_ids) :]
            else:
                ids = self._template([message])
            if message["role"] != "system" and i > 0:
                ids = ids[self.system_message_length :]
            if message["role"] == "assistant" and message.get("step_loss_mask", 1) == 1:
                mask = [0] * self.gen_token_length + [1] * (len(ids) - self.gen_token_length)
            else:
                mask = [0] * len(ids)
            token_ids += ids
            loss_mask += mask
        return token_ids, loss_mask

    def _distill_qwen(self, messages: Sequence[Message]) -> tuple[list[int], list[int]]:
        prompt = self.tokenizer.apply_chat_template(
            [_plain(messages[0])], tokenize=False, add_generation_prompt=True
        )
        prompt_ids = self._encode(prompt)
        response_ids = self._encode(messages[-1].get("content") or "")
        trained = 1 if messages[-1].get("step_loss_mask", 1) == 1 else 0
        return prompt_ids + response_ids, [0] * len(prompt_ids) + [trained] * len(response_ids)

    def get_response_lengths(self, loss_masks: Sequence[Sequence[int]]) -> list[int]:
        return [response_length(mask) for mask in loss_masks]

    def get_text_from_loss_mask(self, token_ids: Sequence[int], loss_mask: Sequence[int]) -> list[str]:
        """The decoded text of every run of trained tokens (to check a mask by eye)."""
        texts: list[str] = []
        run: list[int] = []
        for token, flag in zip(token_ids, loss_mask, strict=True):
            if flag == 1:
                run.append(token)
            elif run:
                texts.append(self.tokenizer.decode(run))
                run = []
        if run:
            texts.append(self.tokenizer.decode(run))
        return texts


def _plain(message: Message) -> dict[str, Any]:
    """The message as the chat template sees it: no step_loss_mask, and null content as empty text."""
    out = {k: v for k, v in message.items() if k != "step_loss_mask"}
    if out.get("content") is None:
        out["content"] = ""
    return out
