"""slime's radix-tree middleware: text-in clients (agents) get token-consistent trajectories, because the router
remembers, per text prefix, the exact token ids (and log-probs, loss mask) that the engine saw and produced, and
sends ``/generate`` the cached ids instead of re-tokenising the text.

Fixed against slime's version: the rewritten request (``input_ids`` from the cache) is what the worker receives;
retries of aborted generations wait without blocking the event loop and never retry an abort sent through the
router's ``/abort_request``; weight versions from SGLang (strings) are compared as numbers; the prefixes that are
used keep their weight version fresh so that garbage collection does not drop them; the cache is bounded (old
weight versions first, then least recently used).
"""

from __future__ import annotations

import asyncio
import heapq
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from router.asgi import ASGIApp, Message, Receive, Scope, Send, read_body, send_json

logger = logging.getLogger(__name__)

# Aborted generations (e.g. cut by a weight update) are retried this many times, after 0.5, 1, 2, 4, 8 s.
MAX_ABORT_RETRIES = 5
FIRST_BACKOFF_S = 0.5


def _version_number(version: Any) -> int | None:
    try:
        return int(version)
    except (TypeError, ValueError):
        return None


@dataclass(eq=False)
class _Node:
    text: str
    token_ids: list[int]
    logp: list[float]
    loss_mask: list[int]
    weight_version: int | None
    last_access: float
    parent: _Node | None
    # First character of the child's text -> children starting with it (their texts need not share more).
    children: dict[str, list[_Node]] = field(default_factory=dict)


@dataclass
class MatchResult:
    matched_prefix: str
    token_ids: list[int]
    logp: list[float]
    loss_mask: list[int]
    remaining_string: str


class StringRadixTrie:
    """Text prefixes -> the token ids (with log-probs and loss mask) that produced them.

    A node is never split: token boundaries do not follow character boundaries, so a node's tokens belong to
    its whole text. ``max_cache_size`` counts token ids over all nodes.
    """

    def __init__(self, max_cache_size: int = 10000, gc_threshold_k: int = 5, tokenizer: Any = None) -> None:
        self.max_cache_size = max_cache_size
        self.gc_threshold_k = gc_threshold_k
        self.tokenizer = tokenizer
        self.root = _Node("", [], [], [], None, 0.0, None)
        self.cur_cache_size = 0
        self.cache_hits = 0
        self.cache_misses = 0

    def _walk(self, text: str) -> list[_Node]:
        """The chain of stored nodes whose texts, concatenated, are the longest stored prefix of ``text``."""
        chain: list[_Node] = []
        node = self.root
        position = 0
        while position < len(text):
            best = None
            for child in node.children.get(text[position], ()):
                if text.startswith(child.text, position) and (
                    best is None or len(child.text) > len(best.text)
                ):
                    best = child
            if best is None:
                break
            chain.append(best)
            node = best
            position += len(best.text)
        return chain

    def find_longest_prefix(self, text: str) -> MatchResult:
        chain = self._walk(text)
        now = time.monotonic()
        tokens: list[int] = []
        logp: list[float] = []
        mask: list[int] = []
        for node in chain:
            node.last_access = now
            tokens += node.token_ids
            logp += node.logp
            mask += node.loss_mask
        if tokens:
            self.cache_hits += 1
        else:
            self.cache_misses += 1
        matched = "".join(node.text for node in chain)
        return MatchResult(matched, tokens, logp, mask, text[len(matched) :])

    def insert(
        self,
        text: str,
        token_ids: list[int],
        logp: list[float] | None = None,
        loss_mask: list[int] | None = None,
        weight_version: int | None = None,
    ) -> bool:
        """Store ``text`` -> ``token_ids``; the part already stored is kept (its tokens are the truth)."""
        if not text or not token_ids:
            return False
        logp = [0.0] * len(token_ids) if logp is None else logp
        loss_mask = [0] * len(token_ids) if loss_mask is None else loss_mask
        if len(logp) != len(token_ids) or len(loss_mask) != len(token_ids):
            logger.debug(
                "radix tree: lengths differ (tokens %d, logp %d, mask %d)",
                len(token_ids),
                len(logp),
                len(loss_mask),
            )
            return False
        now = time.monotonic()
        node = self.root
        position = 0
        consumed = 0
        for step in self._walk(text):
            end = consumed + len(step.token_ids)
            if token_ids[consumed:end] != step.token_ids:
                # The same text reached with other tokens: keep the stored trajectory, do not mix the two.
                return False
            step.last_access = now
            if weight_version is not None and (
                step.weight_version is None or step.weight_version < weight_version
            ):
                step.weight_version = weight_version
            node, position, consumed = step, position + len(step.text), end
        if position == len(text) or consumed == len(token_ids):
            return True
        leaf = _Node(
            text[position:],
            token_ids[consumed:],
            logp[consumed:],
            loss_mask[consumed:],
            weight_version,
            now,
            node,
        )
        node.children.setdefault(leaf.text[0], []).append(leaf)
        self.cur_cache_size += len(leaf.token_ids)
        if self.cur_cache_size > self.max_cache_size:
            self.collect(weight_version)
        return True

    def collect(self, current_version: int | None) -> None:
        """Shrink to ``max_cache_size``: drop prefixes last used by weights more than ``gc_threshold_k`` versions
        old, then least recently used leaves."""
        if current_version is not None:
            threshold = current_version - self.gc_threshold_k
            stack = [self.root]
            while stack:
                node = stack.pop()
                for child in [c for group in node.children.values() for c in group]:
                    if child.weight_version is not None and child.weight_version <= threshold:
                        self._drop_subtree(child)
                    else:
                        stack.append(child)
        if self.cur_cache_size <= self.max_cache_size:
            return
        heap = [(node.last_access, id(node), node) for node in self._nodes() if not node.children]
        heapq.heapify(heap)
        while heap and self.cur_cache_size > self.max_cache_size:
            _, _, node = heapq.heappop(heap)
            parent = node.parent
            self._drop_subtree(node)
            if parent is not None and parent is not self.root and not parent.children:
                heapq.heappush(heap, (parent.last_access, id(parent), parent))

    def retrieve_from_text(
        self, text: str, return_logprob: bool = True
    ) -> tuple[list[int], list[float], list[int]]:
        """Token ids, log-probs and loss mask for ``text``: the cached prefix, then the tokenised rest (log-prob
        0, mask 0). A text never seen is tokenised and cached as a prompt."""
        if not text:
            raise ValueError("text is empty")
        if self.tokenizer is None:
            raise ValueError("the radix tree has no tokenizer")
        match = self.find_longest_prefix(text)
        if match.token_ids:
            extra = (
                self.tokenizer(match.remaining_string, add_special_tokens=False)["input_ids"]
                if match.remaining_string
                else []
            )
            tokens = match.token_ids + extra
            logp = match.logp + [0.0] * len(extra) if return_logprob else [0.0] * len(tokens)
            return tokens, logp, match.loss_mask + [0] * len(extra)
        tokens = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        self.insert(text, tokens)
        return tokens, [0.0] * len(tokens), [0] * len(tokens)

    def get_stats(self) -> dict[str, Any]:
        total = self.cache_hits + self.cache_misses
        return {
            "total_entries": sum(1 for _ in self._nodes()),
            "cache_hits": self.cache_hits,
            "cache_misses": self.cache_misses,
            "hit_rate": self.cache_hits / total if total else 0.0,
            "max_cache_size": self.max_cache_size,
            "cur_cache_size": self.cur_cache_size,
            "gc_threshold_k": self.gc_threshold_k,
        }

    def _nodes(self) -> list[_Node]:
        nodes: list[_Node] = []
        stack = [self.root]
        while stack:
            node = stack.pop()
            for group in node.children.values():
                nodes.extend(group)
                stack.extend(group)
        return nodes

    def _drop_subtree(self, node: _Node) -> None:
        stack = [node]
        while stack:
            current = stack.pop()
            self.cur_cache_size -= len(current.token_ids)
            for group in current.children.values():
                stack.extend(group)
        parent = node.parent
        assert parent is not None
        siblings = parent.children[node.text[0]]
        siblings.remove(node)
        if not siblings:
            del parent.children[node.text[0]]


class RadixTreeMiddleware:
    """Pure ASGI middleware: rewrites ``POST /generate`` to cached token ids, caches what comes back, and serves
    ``POST /retrieve_from_text``. Needs ``--hf-checkpoint`` for the tokenizer."""

    def __init__(self, app: ASGIApp, *, router: Any) -> None:
        self.app = app
        self.router = router
        checkpoint = getattr(router.args, "hf_checkpoint", None)
        if not checkpoint:
            raise ValueError(
                "RadixTreeMiddleware needs --hf-checkpoint: the tokenizer that turns text into token ids"
            )
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=True)
        self.radix_tree = StringRadixTrie(max_cache_size=10000, tokenizer=self.tokenizer)
        # slime's router reads the tree from this attribute.
        router.radix_tree = self.radix_tree

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            if scope["path"] == "/generate":
                await self._generate(scope, receive, send)
                return
            if scope["path"] == "/retrieve_from_text":
                await self._retrieve(receive, send)
                return
        await self.app(scope, receive, send)

    async def _retrieve(self, receive: Receive, send: Send) -> None:
        try:
            payload = json.loads(await read_body(receive))
            text = payload["text"]
            if not isinstance(text, str) or not text:
                raise ValueError("text must be a non-empty string")
        except (ValueError, KeyError, TypeError) as exc:
            await send_json(
                send, 400, {"error": {"type": "client_error", "message": f"text: {exc}", "field": "text"}}
            )
            return
        tokens, logp, mask = self.radix_tree.retrieve_from_text(
            text, return_logprob=bool(payload.get("return_logp", True))
        )
        result = {
            "tokens": tokens,
            "response": text,
            "loss_mask": mask,
            "token_length": len(tokens),
            "loss_mask_length": len(mask),
            "rollout_logp": logp,
        }
        await send_json(send, 200, result)

    async def _generate(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await read_body(receive)
        try:
            payload = json.loads(body)
        except ValueError:
            payload = None
        text = self._input_text(payload)
        if not text:
            await self.app(scope, _replay(body, receive), send)
            return
        input_ids, input_logp, input_mask = self.radix_tree.retrieve_from_text(text)
        payload.pop("text", None)
        payload["input_ids"] = input_ids
        new_body = json.dumps(payload).encode()
        if payload.get("stream"):
            # A stream goes through as it comes; only whole answers can be checked and cached.
            await self.app(scope, _replay(new_body, receive), send)
            return
        epoch = self.router.abort_epoch
        captured: _Captured | None = None
        for attempt in range(MAX_ABORT_RETRIES + 1):
            captured = await _capture(self.app, scope, _replay(new_body, receive))
            answer = captured.json()
            finish = ((answer or {}).get("meta_info") or {}).get("finish_reason") or {}
            if (
                finish.get("type") != "abort"
                or self.router.abort_epoch != epoch
                or attempt == MAX_ABORT_RETRIES
            ):
                break
            delay = FIRST_BACKOFF_S * 2**attempt
            logger.info(
                "generation aborted by the engine; retrying in %.1fs (%d/%d)",
                delay,
                attempt + 1,
                MAX_ABORT_RETRIES,
            )
            await asyncio.sleep(delay)
        assert captured is not None
        await captured.replay(send)
        answer = captured.json()
        if captured.status == 200 and isinstance(answer, dict):
            self._remember(text, input_ids, input_logp, input_mask, answer)

    def _input_text(self, payload: Any) -> str | None:
        if not isinstance(payload, dict):
            return None
        text = payload.get("text")
        if isinstance(text, str):
            return text
        ids = payload.get("input_ids")
        if isinstance(ids, list) and ids and all(isinstance(token, int) for token in ids):
            return self.tokenizer.decode(ids)
        return None

    def _remember(
        self, text: str, input_ids: list[int], input_logp: list[float], input_mask: list[int], answer: dict
    ) -> None:
        meta = answer.get("meta_info") or {}
        if (meta.get("finish_reason") or {}).get("type") == "abort" or not isinstance(
            answer.get("text"), str
        ):
            return
        pairs = meta.get("output_token_logprobs")
        if pairs:
            new_ids = [int(pair[1]) for pair in pairs]
            new_logp = [float(pair[0]) for pair in pairs]
        else:
            new_ids = (
                answer.get("output_ids")
                or self.tokenizer(answer["text"], add_special_tokens=False)["input_ids"]
            )
            new_logp = [0.0] * len(new_ids)
        self.radix_tree.insert(
            text + answer["text"],
            input_ids + new_ids,
            input_logp + new_logp,
            input_mask + [1] * len(new_ids),
            weight_version=_version_number(meta.get("weight_version")),
        )


@dataclass
class _Captured:
    status: int = 500
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError:
            return None

    async def replay(self, send: Send) -> None:
        headers = [
            (k, v) for k, v in self.headers if k.lower() not in (b"content-length", b"transfer-encoding")
        ]
        headers.append((b"content-length", str(len(self.body)).encode()))
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": bytes(self.body)})


async def _capture(app: ASGIApp, scope: Scope, receive: Receive) -> _Captured:
    captured = _Captured()

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            captured.status = message["status"]
            captured.headers = list(message.get("headers", []))
        elif message["type"] == "http.response.body":
            captured.body += message.get("body", b"")

    await app(scope, receive, send)
    return captured


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive channel that yields ``body`` once, then hands over to the client's own channel."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replayed
