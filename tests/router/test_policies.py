"""Load-balancing policies and the prefix tree behind cache-aware routing, against hand-worked cases."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from router.policies import (
    CacheAware,
    CacheAwareConfig,
    LeastLoad,
    PowerOfTwo,
    PrefixTree,
    RoundRobin,
    make_policy,
    rendezvous,
    routing_key,
)

A, B, C = "http://a:1", "http://b:1", "http://c:1"


def test_prefix_tree_matches_longest_prefix_and_splits_edges() -> None:
    tree = PrefixTree()
    tree.insert("hello world", A, 1.0)
    assert tree.match("hello world, again") == (11, {A: 1.0})
    # A partial edge match still belongs to the worker that was sent the longer text.
    assert tree.match("help") == (3, {A: 1.0})
    tree.insert("help me", B, 2.0)
    matched, owners = tree.match("hel")
    assert matched == 3 and set(owners) == {A, B}
    assert tree.match("help me now") == (7, {B: 2.0})
    assert tree.match("hello") == (5, {A: 1.0})
    assert tree.match("xyz") == (0, {})
    assert tree.sizes == {A: len("hello world"), B: len("help me")}


def test_prefix_tree_evicts_least_recently_used_leaves_of_one_worker() -> None:
    tree = PrefixTree()
    tree.insert("aaaa-old", A, 1.0)
    tree.insert("aaaa-new", A, 5.0)
    tree.insert("aaaa-old", B, 9.0)
    assert tree.sizes[A] == len("aaaa-old") + len("new")
    tree.evict(A, max_size=len("aaaa-new"))
    # A's oldest leaf ("-old") goes; B still holds it; A keeps "aaaa-new".
    assert tree.sizes[A] == len("aaaa-new")
    assert tree.match("aaaa-old") == (8, {B: 9.0})
    assert tree.match("aaaa-new")[1] == {A: 5.0}


def test_prefix_tree_forgets_a_removed_worker_entirely() -> None:
    tree = PrefixTree()
    tree.insert("shared prefix one", A, 1.0)
    tree.insert("shared prefix two", B, 1.0)
    tree.remove_tenant(A)
    assert A not in tree.sizes
    assert tree.match("shared prefix one") == (len("shared prefix "), {B: 1.0})
    tree.remove_tenant(B)
    assert tree.root.children == {}


def test_cache_aware_sends_a_grpo_group_to_one_worker_and_spreads_groups() -> None:
    policy = CacheAware()
    load: Counter[str] = Counter()
    chosen_per_group = []
    for group in range(60):
        prompt = f"Question {group}: what is {group} + {group}? Think step by step."
        chosen = set()
        for _ in range(8):
            url = policy.select([A, B, C], load, prompt)
            load[url] += 1
            chosen.add(url)
        assert len(chosen) == 1, f"group {group} went to {chosen}"
        chosen_per_group.append(chosen.pop())
        load.clear()
    spread = Counter(chosen_per_group)
    assert set(spread) == {A, B, C} and min(spread.values()) >= 10, spread


def test_a_new_prompt_gets_the_same_worker_from_every_router_process() -> None:
    # Two policies stand for two router processes or replicas, each with its own tree.
    first, second = CacheAware(), CacheAware()
    for index in range(20):
        prompt = f"prompt {index}"
        assert first.select([A, B, C], {}, prompt) == second.select([C, A, B], {}, prompt)
    # A worker leaving moves only its own prompts.
    before = {i: rendezvous([A, B, C], f"p{i}") for i in range(100)}
    after = {i: rendezvous([A, B], f"p{i}") for i in range(100)}
    assert all(after[i] == before[i] for i in before if before[i] != C)


def test_cache_aware_follows_a_conversation_prefix() -> None:
    policy = CacheAware()
    first = policy.select([A, B, C], {}, "system: be brief\nuser: hi")
    policy.select([A, B, C], {}, "something else entirely")
    assert policy.select([A, B, C], {}, "system: be brief\nuser: hi\nassistant: hello\nuser: more") == first


def test_cache_aware_balances_when_load_is_uneven() -> None:
    policy = CacheAware(CacheAwareConfig(balance_abs_threshold=4, balance_rel_threshold=1.5))
    prompt = "the same prompt every time"
    owner = policy.select([A, B], {}, prompt)
    other = B if owner == A else A
    # Within the thresholds the cache wins; beyond both, the least loaded worker does.
    assert policy.select([A, B], {owner: 4, other: 0}, prompt) == owner
    assert policy.select([A, B], {owner: 5, other: 0}, prompt) == other


def test_cache_aware_ignores_a_holder_that_is_not_a_candidate() -> None:
    policy = CacheAware()
    prompt = "prompt held by a worker that is not HEALTHY now"
    assert policy.select([A], {}, prompt) == A
    assert policy.select([B, C], {B: 3, C: 0}, prompt) == rendezvous([B, C], prompt)
    policy.forget(A)
    assert A not in policy.tree.sizes


def test_least_load_round_robin_and_power_of_two() -> None:
    assert LeastLoad().select([A, B, C], {A: 2, B: 0, C: 1}, None) == B
    idle = LeastLoad()
    assert {idle.select([A, B, C], {}, None) for _ in range(3)} == {A, B, C}
    rr = RoundRobin()
    assert [rr.select([A, B, C], {}, None) for _ in range(4)] == [A, B, C, A]
    p2 = PowerOfTwo(random.Random(0))
    picks = Counter(p2.select([A, B], {A: 10, B: 0}, None) for _ in range(20))
    assert picks == {B: 20}
    assert p2.select([C], {}, None) == C


def test_routing_key_reads_text_prompt_ids_and_messages() -> None:
    assert routing_key(json.dumps({"text": "hi there"}).encode()) == "hi there"
    assert routing_key(json.dumps({"prompt": ["first", "second"]}).encode()) == "first"
    ids_key = routing_key(json.dumps({"input_ids": [5, 6, 7]}).encode())
    assert ids_key is not None and ids_key.endswith("\x05\x06\x07")
    # Token ids never collide with a text that happens to have the same characters.
    assert ids_key != routing_key(json.dumps({"text": "\x05\x06\x07"}).encode())
    chat = routing_key(json.dumps({"messages": [{"role": "user", "content": "hello"}]}).encode())
    assert chat == "user:hello"
    assert routing_key(b"not json") is None
    assert routing_key(b"[1, 2]") is None


def test_make_policy_rejects_unknown_names() -> None:
    assert isinstance(make_policy("round_robin"), RoundRobin)
    with pytest.raises(ValueError, match="--policy 'fastest'"):
        make_policy("fastest")
