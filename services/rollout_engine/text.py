"""Token-to-text for engine outputs with SGLang's rules: skip/space special tokens, trim a matched stop, and
decode tails for stop-string checks."""

from __future__ import annotations

import functools
from typing import Any

from services.rollout_engine.requests import GenerationParams


class TextCodec:
    """Wraps one Hugging Face tokenizer; use one instance per thread (fast tokenizers are not re-entrant)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self._stop_lengths = functools.lru_cache(maxsize=1024)(self._max_stop_tokens)

    def encode(self, text: str) -> list[int]:
        # As SGLang does: the tokenizer's own special-token handling (BOS for Llama, none for Qwen).
        return list(self.tokenizer.encode(text))

    def decode(self, ids: list[int], params: GenerationParams | None = None) -> str:
        if params is None:
            return self.tokenizer.decode(ids)
        # spaces_between_special_tokens is forwarded as SGLang does; fast tokenizers ignore it.
        return self.tokenizer.decode(
            ids,
            skip_special_tokens=params.skip_special_tokens,
            spaces_between_special_tokens=params.spaces_between_special_tokens,
        )

    def final_text(self, ids: list[int], params: GenerationParams, finish_reason: dict | None) -> str:
        """The response text: without the matched stop token / after-stop-string text unless ``no_stop_trim``."""
        matched = (finish_reason or {}).get("matched")
        trim = not params.no_stop_trim and matched is not None
        if trim and isinstance(matched, int) and ids:
            return self.decode(ids[:-1], params)
        text = self.decode(ids, params)
        if trim and isinstance(matched, str):
            pos = text.find(matched)
            if pos != -1:
                return text[:pos]
        return text

    def decode_tail(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def stop_token_lengths(self, stops: tuple[str, ...]) -> int:
        """How many tokens a stop string can span at most (the tail decoded for the stop check)."""
        return self._stop_lengths(stops)

    def _max_stop_tokens(self, stops: tuple[str, ...]) -> int:
        return max((len(self.tokenizer.encode(s, add_special_tokens=False)) for s in stops), default=0)

    def token_texts(self, ids: list[int]) -> list[str]:
        return [self.tokenizer.decode([i]) for i in ids]
