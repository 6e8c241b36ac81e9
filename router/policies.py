"""Load-balancing policies: which HEALTHY worker takes a request.

``cache_aware`` follows sglang-router's algorithm: unless the load is out of balance, a request goes to the worker
whose approximate prefix tree (the texts or token ids it was sent recently) matches the longest part of its
prompt, so that the n samples of a GRPO group, or the turns of one conversation, hit the same engine's KV cache.
A prompt that no worker holds goes where its hash says (rendezvous hashing) rather than, as in sglang-router, to
the worker with the smallest tree: every router process and replica then makes the same first choice.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import json
import random
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

POLICIES = ("cache_aware", "least_load", "round_robin", "power_of_two")


class Policy(ABC):
    """Chooses among candidate worker URLs (never empty), given this replica's in-flight count per worker."""

    # Whether ``select`` needs the request's routing key (which costs parsing the JSON body).
    needs_key = False

    @abstractmethod
    def select(self, candidates: Sequence[str], load: Mapping[str, int], key: str | None) -> str:
        """The chosen URL."""

    def forget(self, url: str) -> None:  # noqa: B027 - most policies remember nothing per worker
        """Drop what is remembered about a worker that was removed or died."""


class RoundRobin(Policy):
    def __init__(self) -> None:
        self._counter = itertools.count()

    def select(self, candidates: Sequence[str], load: Mapping[str, int], key: str | None) -> str:
        return candidates[next(self._counter) % len(candidates)]


class LeastLoad(Policy):
    """The worker with the fewest requests in flight; ties rotate so that an idle fleet still spreads work."""

    def __init__(self) -> None:
        self._counter = itertools.count()

    def select(self, candidates: Sequence[str], load: Mapping[str, int], key: str | None) -> str:
        start = next(self._counter) % len(candidates)
        rotated = [*candidates[start:], *candidates[:start]]
        return min(rotated, key=lambda url: load.get(url, 0))


class PowerOfTwo(Policy):
    """The less loaded of two workers drawn at random."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def select(self, candidates: Sequence[str], load: Mapping[str, int], key: str | None) -> str:
        if len(candidates) == 1:
            return candidates[0]
        first, second = self._rng.sample(candidates, 2)
        return first if load.get(first, 0) <= load.get(second, 0) else second


def _common_prefix_len(edge: str, text: str, start: int) -> int:
    """How many leading characters of ``edge`` equal ``text[start:...]`` (binary search over C comparisons)."""
    limit = min(len(edge), len(text) - start)
    if text.startswith(edge[:limit], start):
        return limit
    low, high = 0, limit
    while high - low > 1:
        middle = (low + high) // 2
        if text.startswith(edge[:middle], start):
            low = middle
        else:
            high = middle
    return low


class _Node:
    __slots__ = ("children", "edge", "parent", "tenants")

    def __init__(self, edge: str, parent: _Node | None) -> None:
        self.edge = edge
        self.parent = parent
        self.children: dict[str, _Node] = {}
        # worker URL -> last time a request with this prefix went to it
        self.tenants: dict[str, float] = {}


class PrefixTree:
    """A radix tree of request texts shared by all workers; each node remembers which workers were sent it.

    Sizes are counted in characters per worker; ``evict`` drops a worker's least recently used leaves.
    """

    def __init__(self) -> None:
        self.root = _Node("", None)
        self.sizes: dict[str, int] = {}

    def match(self, text: str) -> tuple[int, dict[str, float]]:
        """Length of the longest stored prefix of ``text`` and the workers (with access times) that hold it."""
        node = self.root
        matched = 0
        owners: dict[str, float] = {}
        while matched < len(text):
            child = node.children.get(text[matched])
            if child is None:
                break
            common = _common_prefix_len(child.edge, text, matched)
            matched += common
            owners = child.tenants
            if common < len(child.edge):
                break
            node = child
        return matched, owners

    def insert(self, text: str, tenant: str, now: float) -> None:
        """Record that ``text`` was sent to ``tenant`` at ``now``."""
        node = self.root
        position = 0
        while position < len(text):
            child = node.children.get(text[position])
            if child is None:
                leaf = _Node(text[position:], node)
                leaf.tenants[tenant] = now
                node.children[text[position]] = leaf
                self.sizes[tenant] = self.sizes.get(tenant, 0) + len(leaf.edge)
                return
            common = _common_prefix_len(child.edge, text, position)
            if common < len(child.edge):
                child = self._split(child, common)
            if tenant not in child.tenants:
                self.sizes[tenant] = self.sizes.get(tenant, 0) + len(child.edge)
            child.tenants[tenant] = now
            node = child
            position += common

    def evict(self, tenant: str, max_size: int) -> None:
        """Drop ``tenant``'s least recently used leaves until it holds at most ``max_size`` characters."""
        if self.sizes.get(tenant, 0) <= max_size:
            return
        heap = [(node.tenants[tenant], id(node), node) for node in self._tenant_leaves(tenant)]
        heapq.heapify(heap)
        while heap and self.sizes[tenant] > max_size:
            _, _, node = heapq.heappop(heap)
            parent = self._release(node, tenant)
            if (
                parent is not None
                and parent is not self.root
                and tenant in parent.tenants
                and not any(tenant in child.tenants for child in parent.children.values())
            ):
                heapq.heappush(heap, (parent.tenants[tenant], id(parent), parent))

    def remove_tenant(self, tenant: str) -> None:
        """Forget every prefix sent to ``tenant``."""
        stack = list(self.root.children.values())
        nodes = []
        while stack:
            node = stack.pop()
            if tenant in node.tenants:
                nodes.append(node)
                stack.extend(node.children.values())
        # Deepest first, so that a pruned child never leaves its parent half-visited.
        for node in reversed(nodes):
            self._release(node, tenant)
        self.sizes.pop(tenant, None)

    def _split(self, child: _Node, at: int) -> _Node:
        """Cut ``child``'s edge after ``at`` characters; the upper half keeps the same tenants (sizes unchanged)."""
        parent = child.parent
        assert parent is not None
        upper = _Node(child.edge[:at], parent)
        upper.tenants = dict(child.tenants)
        parent.children[upper.edge[0]] = upper
        child.edge = child.edge[at:]
        child.parent = upper
        upper.children[child.edge[0]] = child
        return upper

    def _release(self, node: _Node, tenant: str) -> _Node | None:
        """Remove ``tenant`` from ``node``, pruning the node if nobody holds it any more; returns its parent."""
        if node.tenants.pop(tenant, None) is not None:
            self.sizes[tenant] -= len(node.edge)
        parent = node.parent
        if not node.tenants and not node.children and parent is not None:
            del parent.children[node.edge[0]]
        return parent

    def _tenant_leaves(self, tenant: str) -> list[_Node]:
        leaves = []
        stack = [child for child in self.root.children.values() if tenant in child.tenants]
        while stack:
            node = stack.pop()
            held = [child for child in node.children.values() if tenant in child.tenants]
            if held:
                stack.extend(held)
            else:
                leaves.append(node)
        return leaves


@dataclass(frozen=True)
class CacheAwareConfig:
    """sglang-router's knobs, same names and meaning."""

    cache_threshold: float = 0.3
    balance_abs_threshold: int = 64
    balance_rel_threshold: float = 1.5
    max_tree_size: int = 1 << 24


class CacheAware(Policy):
    """Prefix affinity while the load is balanced; the least loaded worker when it is not."""

    needs_key = True

    def __init__(self, config: CacheAwareConfig | None = None) -> None:
        self.config = config or CacheAwareConfig()
        self.tree = PrefixTree()

    def select(self, candidates: Sequence[str], load: Mapping[str, int], key: str | None) -> str:
        loads = [load.get(url, 0) for url in candidates]
        least = candidates[loads.index(min(loads))]
        if not key:
            return least
        high, low = max(loads), min(loads)
        config = self.config
        if high - low > config.balance_abs_threshold and high > low * config.balance_rel_threshold:
            chosen = least
        else:
            matched, owners = self.tree.match(key)
            holders = [url for url in candidates if url in owners]
            if holders and matched / len(key) > config.cache_threshold:
                chosen = min(holders, key=lambda url: load.get(url, 0))
            else:
                chosen = rendezvous(candidates, key)
        self.tree.insert(key, chosen, time.monotonic())
        if self.tree.sizes.get(chosen, 0) > config.max_tree_size:
            # Evicting to 80% spreads the cost of the walk over many inserts.
            self.tree.evict(chosen, int(config.max_tree_size * 0.8))
        return chosen

    def forget(self, url: str) -> None:
        self.tree.remove_tenant(url)


def rendezvous(candidates: Sequence[str], key: str) -> str:
    """The candidate with the highest hash of (key, candidate): a prompt nobody holds goes to the same worker from
    every router process and replica, so the n samples of a group meet even when their connections do not."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16).digest()
    return max(candidates, key=lambda url: hashlib.blake2b(digest + url.encode(), digest_size=8).digest())


def routing_key(body: bytes) -> str | None:
    """The prompt a request carries, as the text its prefix is matched on: ``text``, ``prompt`` or chat
    ``messages`` as text, ``input_ids`` as one character per token id (so token and text prompts never mix)."""
    try:
        payload: Any = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(payload, dict):
        return None
    for name in ("text", "prompt"):
        value = payload.get(name)
        if isinstance(value, list) and value and isinstance(value[0], str):
            value = value[0]
        if isinstance(value, str):
            return value
    ids = payload.get("input_ids")
    if isinstance(ids, list) and ids and isinstance(ids[0], list):
        ids = ids[0]
    if isinstance(ids, list) and ids:
        try:
            # A private-use prefix keeps token keys apart from any text.
            return "\U000f0000" + "".join(map(chr, ids))
        except (TypeError, ValueError, OverflowError):
            return None
    messages = payload.get("messages")
    if isinstance(messages, list):
        parts = []
        for message in messages:
            if isinstance(message, dict):
                content = message.get("content")
                parts.append(
                    f"{message.get('role', '')}:{content if isinstance(content, str) else json.dumps(content)}"
                )
        return "\n".join(parts) or None
    return None


def make_policy(name: str, cache_config: CacheAwareConfig | None = None) -> Policy:
    if name == "cache_aware":
        return CacheAware(cache_config)
    if name == "least_load":
        return LeastLoad()
    if name == "round_robin":
        return RoundRobin()
    if name == "power_of_two":
        return PowerOfTwo()
    raise ValueError(f"unknown --policy {name!r}; choose one of {', '.join(POLICIES)}")
