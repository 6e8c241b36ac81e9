"""slime's radix-tree middleware, with its bugs fixed: the trie on its own, then the middleware in a real router in
front of EchoUpstream (which echoes the token ids it receives, so the test sees what the engine was sent)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest

from router.middleware.radix_tree import StringRadixTrie
from services.core.tiny_model import default_corpus, train_tokenizer
from tests.router.conftest import post_many


class CharTokenizer:
    """One token per character: token boundaries are obvious in the assertions."""

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [ord(char) for char in text]}


def ids(text: str) -> list[int]:
    return [ord(char) for char in text]


def test_trie_returns_cached_tokens_for_the_prefix_and_tokenises_the_rest() -> None:
    trie = StringRadixTrie(tokenizer=CharTokenizer())
    # The cached trajectory has its own tokens for "Hi there" (one id, 1000), not the tokenizer's.
    assert trie.insert("Hi there", [1000], [-0.5], [1], weight_version=3)
    tokens, logp, mask = trie.retrieve_from_text("Hi there, friend")
    assert tokens == [1000, *ids(", friend")]
    assert logp == [-0.5] + [0.0] * len(", friend")
    assert mask == [1] + [0] * len(", friend")
    # A text never seen is tokenised and remembered as a prompt (mask 0).
    assert trie.retrieve_from_text("Bye") == (ids("Bye"), [0.0] * 3, [0] * 3)
    assert trie.find_longest_prefix("Bye now").matched_prefix == "Bye"


def test_trie_keeps_the_stored_trajectory_when_tokens_disagree() -> None:
    trie = StringRadixTrie(tokenizer=CharTokenizer())
    trie.insert("abc", [1, 2, 3])
    assert trie.insert("abcdef", [1, 2, 3, 4, 5, 6])
    assert trie.find_longest_prefix("abcdef").token_ids == [1, 2, 3, 4, 5, 6]
    # Same text, other tokens: refused rather than mixed into the stored path.
    assert not trie.insert("abcxyz", [9, 9, 9, 7, 8, 9])
    assert not trie.insert("abc", [1, 2], [0.0], [0, 0])


def test_garbage_collection_keeps_prefixes_in_use_and_bounds_the_size() -> None:
    trie = StringRadixTrie(max_cache_size=20, gc_threshold_k=2, tokenizer=CharTokenizer())
    trie.insert("system: ", ids("system: "), weight_version=1)
    trie.insert("old answer", ids("old answer"), weight_version=1)
    # Using the shared prefix under newer weights refreshes its version (slime left it at 1 and dropped it).
    trie.insert("system: hi", ids("system: hi"), weight_version=5)
    trie.insert("abc", ids("abc"), weight_version=5)
    assert trie.find_longest_prefix("old answer").token_ids == []
    assert trie.find_longest_prefix("system: hi").token_ids == ids("system: hi")
    assert trie.cur_cache_size == len("system: hi") + len("abc")
    # Over the limit with nothing outdated: the least recently used leaf goes first.
    trie.insert("zzzz", ids("zzzz"), weight_version=5)
    trie.find_longest_prefix("system: hi")
    trie.insert("yyyyyy", ids("yyyyyy"), weight_version=5)
    assert trie.cur_cache_size <= 20
    assert trie.find_longest_prefix("abc").token_ids == []
    assert trie.find_longest_prefix("system: hi").token_ids == ids("system: hi")
    assert trie.find_longest_prefix("zzzz").token_ids == ids("zzzz")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Hugging Face tokenizer directory (the tiny model's BPE), all the middleware needs from --hf-checkpoint."""
    from transformers import PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("tokenizer")
    raw = train_tokenizer(default_corpus(lines=200), 400)
    PreTrainedTokenizerFast(
        tokenizer_object=raw, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    ).save_pretrained(out)
    return out


def test_generate_is_sent_as_cached_token_ids_and_the_answer_is_cached(
    start_router, echo_upstreams, tokenizer_dir: Path
) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    (upstream,) = echo_upstreams(1)
    router = start_router(
        "--hf-checkpoint",
        str(tokenizer_dir),
        "--use-slime-router",
        "--slime-router-middleware-paths",
        "slime.router.middleware_hub.radix_tree_middleware.RadixTreeMiddleware",
        "--worker-urls",
        upstream.url,
    )
    router.wait_state(upstream.url, "HEALTHY")
    prompt = "What is 12 + 30? The answer is"
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    body = {"text": prompt, "sampling_params": {"max_new_tokens": 100}, "return_logprob": True}
    answer = httpx.post(f"{router.url}/generate", json=body, timeout=30).json()
    # EchoUpstream answers with the ids it was given: the engine got token ids, not the text.
    assert answer["output_ids"] == prompt_ids

    full = prompt + answer["text"]
    retrieved = httpx.post(
        f"{router.url}/retrieve_from_text", json={"text": full, "return_logp": True}
    ).json()
    assert retrieved["tokens"] == prompt_ids + prompt_ids
    assert retrieved["loss_mask"] == [0] * len(prompt_ids) + [1] * len(prompt_ids)
    assert retrieved["rollout_logp"] == [0.0] * (2 * len(prompt_ids))
    assert retrieved["token_length"] == retrieved["loss_mask_length"] == 2 * len(prompt_ids)
    missing = httpx.post(f"{router.url}/retrieve_from_text", json={"return_logp": True})
    assert missing.status_code == 400 and missing.json()["error"]["field"] == "text"


def test_engine_aborts_are_retried_but_router_aborts_are_not(
    start_router, echo_upstreams, tokenizer_dir: Path
) -> None:
    (upstream,) = echo_upstreams(1, token_latency=0.1)
    router = start_router(
        "--hf-checkpoint",
        str(tokenizer_dir),
        "--slime-router-middleware-paths",
        "RadixTreeMiddleware",
        "--worker-urls",
        upstream.url,
    )
    router.wait_state(upstream.url, "HEALTHY")
    body = {"text": "The quick brown fox jumps over the lazy dog.", "sampling_params": {"max_new_tokens": 12}}

    async def generate_while(abort_url: str) -> tuple[dict, float]:
        pending = asyncio.ensure_future(post_many(f"{router.url}/generate", [body]))
        while not upstream.stats()["in_flight"]:
            await asyncio.sleep(0.02)
        started = time.monotonic()
        async with httpx.AsyncClient() as client:
            await client.post(abort_url, json={"abort_all": True})
        (answer,) = await pending
        return answer.body, time.monotonic() - started

    before = upstream.stats()["requests"]
    # Aborted by the engine itself (e.g. a weight update): retried without blocking, and completed.
    answer, _ = asyncio.run(generate_while(f"{upstream.url}/abort_request"))
    assert answer["meta_info"]["finish_reason"]["type"] == "length"
    assert upstream.stats()["requests"] == before + 2
    # Aborted through the router (end of a rollout): the abort is the answer.
    answer, elapsed = asyncio.run(generate_while(f"{router.url}/abort_request"))
    assert answer["meta_info"]["finish_reason"]["type"] == "abort"
    assert upstream.stats()["requests"] == before + 3
    assert elapsed < 1.0
