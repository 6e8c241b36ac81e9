"""Clients of reward services: slime's ``remote_rm`` POST with retries and backoff, and the async HTTP and gRPC
clients of this reward-model service that rollout workers use.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from numbers import Real
from typing import Any, TypeVar

import grpc
import httpx

from protos import slime_pb2, slime_pb2_grpc
from services.core.grpc_util import DEFAULT_DEADLINE_S, dict_to_struct, grpc_channel, struct_to_dict
from services.core.sample import Sample
from services.reward_model.graders import Reward

logger = logging.getLogger(__name__)

T = TypeVar("T")

# slime's remote_rm: aiohttp's 120 s total timeout, 10 attempts, backoff min(2**n, 30) s plus up to 1 s of jitter.
REMOTE_TIMEOUT_S = 120.0
REWARD_ERROR_HEADER = "X-Reward-Error"
_RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})
_RETRYABLE_GRPC = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE})


@dataclass(frozen=True)
class ScoredReward:
    """A reward and, when scoring failed and the failure reward stands in for it, why."""

    value: Reward
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class RetryPolicy:
    """Attempt n (from 1) that fails retryably waits ``min(base * 2**(n-1), max) + U(0, jitter)`` seconds."""

    max_attempts: int = 10
    backoff_base_s: float = 1.0
    backoff_max_s: float = 30.0
    jitter_s: float = 1.0

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        backoff = min(self.backoff_base_s * 2 ** (attempt - 1), self.backoff_max_s)
        if retry_after is not None:
            backoff = min(max(backoff, retry_after), self.backoff_max_s)
        return backoff + random.uniform(0, self.jitter_s)


class RemoteRewardError(Exception):
    """A reward server did not give a reward: unreachable past the retries, a 4xx, or a body that is no reward."""


class RewardServiceError(Exception):
    """The reward-model service refused a request (bad input, unknown reward type, auth, overload past retries)."""

    def __init__(self, status: int | str, message: str):
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return float(response.headers.get("retry-after", ""))
    except ValueError:
        return None


async def _post_with_retries(
    client: httpx.AsyncClient, url: str, payload: Any, policy: RetryPolicy
) -> httpx.Response:
    """POST ``payload``; retry transport errors, 429 and 5xx with backoff; return the first other answer."""
    for attempt in range(1, policy.max_attempts + 1):
        retry_after = None
        try:
            response = await client.post(url, json=payload)
        except httpx.TransportError as exc:
            failure = f"{type(exc).__name__}: {exc}"
        else:
            if response.status_code not in _RETRYABLE_STATUS:
                return response
            failure = f"HTTP {response.status_code}: {response.text[:200]}"
            retry_after = _retry_after(response)
        if attempt == policy.max_attempts:
            raise RemoteRewardError(f"POST {url} failed after {attempt} attempts; last: {failure}")
        delay = policy.delay(attempt, retry_after)
        logger.info(
            "POST %s: %s; retry %d/%d in %.2fs", url, failure, attempt, policy.max_attempts - 1, delay
        )
        await asyncio.sleep(delay)
    raise AssertionError("unreachable: the loop returns or raises")


def _as_reward(body: Any, source: str) -> Reward:
    if isinstance(body, dict) or (isinstance(body, Real) and not isinstance(body, bool)):
        return body
    raise RemoteRewardError(f"{source} answered {body!r}, which is neither a number nor a dict")


def _auth_headers(auth_token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {auth_token}"} if auth_token else {}


class RemoteRewardClient:
    """slime's ``remote_rm``: POST ``{prompt, response, label}`` to ``url``, answer the JSON reward verbatim."""

    def __init__(
        self,
        url: str,
        *,
        proxy: str | None = None,
        timeout_s: float = REMOTE_TIMEOUT_S,
        policy: RetryPolicy | None = None,
        auth_token: str | None = None,
    ):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"--rm-url must be an http(s) URL, got {url!r}")
        self.url = url
        self.policy = policy or RetryPolicy()
        # Only --http-proxy routes these requests: slime's session ignores the environment's proxy settings too.
        self._client = httpx.AsyncClient(
            proxy=proxy, timeout=timeout_s, trust_env=False, headers=_auth_headers(auth_token)
        )

    async def score(self, payload: dict[str, Any]) -> Reward:
        response = await _post_with_retries(self._client, self.url, payload, self.policy)
        if response.is_error:
            raise RemoteRewardError(
                f"POST {self.url} answered HTTP {response.status_code}: {response.text[:200]}"
            )
        try:
            body = response.json()
        except ValueError as exc:
            raise RemoteRewardError(f"POST {self.url} answered a body that is not JSON: {exc}") from exc
        return _as_reward(body, f"POST {self.url}")

    async def aclose(self) -> None:
        await self._client.aclose()


def reward_request(sample: Sample) -> dict[str, Any]:
    """The ``POST /reward`` body for ``sample``: slime's remote_rm payload plus the sample's metadata."""
    return {
        "prompt": sample.prompt,
        "response": sample.response,
        "label": sample.label,
        "metadata": sample.metadata,
    }


def reward_item(sample: Sample) -> slime_pb2.RewardItem:
    """``sample`` as a gRPC RewardItem; a multimodal prompt (a list of parts) travels as its JSON text."""
    prompt = sample.prompt if isinstance(sample.prompt, str) else json.dumps(sample.prompt)
    return slime_pb2.RewardItem(
        uid=sample.uid,
        prompt=prompt,
        response=sample.response or "",
        label="" if sample.label is None else str(sample.label),
        metadata=dict_to_struct(sample.metadata or {}, path="RewardItem.metadata"),
    )


class RewardHttpClient:
    """Async client of this service's HTTP API (``/reward``, ``/reward/batch``); retries 429 and 5xx."""

    def __init__(
        self,
        base_url: str,
        *,
        auth_token: str | None = None,
        timeout_s: float = REMOTE_TIMEOUT_S,
        policy: RetryPolicy | None = None,
        proxy: str | None = None,
    ):
        self.base_url = base_url.rstrip("/")
        self.policy = policy or RetryPolicy(
            max_attempts=5, backoff_base_s=0.25, backoff_max_s=4.0, jitter_s=0.25
        )
        self._client = httpx.AsyncClient(
            proxy=proxy, timeout=timeout_s, trust_env=False, headers=_auth_headers(auth_token)
        )

    async def _post(self, path: str, payload: Any) -> httpx.Response:
        url = self.base_url + path
        try:
            response = await _post_with_retries(self._client, url, payload, self.policy)
        except RemoteRewardError as exc:
            raise RewardServiceError("unavailable", str(exc)) from exc
        if response.is_error:
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text[:200]
            raise RewardServiceError(response.status_code, message)
        return response

    async def score(self, sample: Sample) -> ScoredReward:
        response = await self._post("/reward", reward_request(sample))
        return ScoredReward(
            _as_reward(response.json(), "POST /reward"), response.headers.get(REWARD_ERROR_HEADER)
        )

    async def score_batch(
        self,
        samples: Sequence[Sample],
        *,
        rm_type: str | None = None,
        reward_key: str | None = None,
        group: bool = False,
    ) -> list[ScoredReward]:
        payload = {
            "items": [reward_request(sample) for sample in samples],
            "rm_type": rm_type,
            "reward_key": reward_key,
            "group": group,
        }
        body = (await self._post("/reward/batch", payload)).json()
        return [
            ScoredReward(value, error) for value, error in zip(body["rewards"], body["errors"], strict=True)
        ]

    async def aclose(self) -> None:
        await self._client.aclose()


def reward_from_proto(value: slime_pb2.RewardValue) -> ScoredReward:
    """A RewardValue as the HTTP API answers it: the dict when ``is_dict``, else the number (which a reward key
    may have picked out of the dict still shown in ``fields``)."""
    reward: Reward = struct_to_dict(value.fields) if value.is_dict else value.value
    return ScoredReward(reward, value.error or None)


class RewardGrpcClient:
    """Async client of the RewardService (Score, ScoreGroup); retries RESOURCE_EXHAUSTED with backoff."""

    def __init__(
        self,
        addr: str,
        *,
        auth_token: str | None = None,
        timeout_s: float = DEFAULT_DEADLINE_S,
        policy: RetryPolicy | None = None,
    ):
        self.addr = addr
        self.timeout_s = timeout_s
        self.policy = policy or RetryPolicy(
            max_attempts=5, backoff_base_s=0.25, backoff_max_s=4.0, jitter_s=0.25
        )
        self._metadata = (("authorization", f"Bearer {auth_token}"),) if auth_token else None
        self._channel = grpc_channel(addr)
        self._stub = slime_pb2_grpc.RewardServiceStub(self._channel)

    async def _call(self, rpc: Callable[..., Awaitable[T]], request: slime_pb2.ScoreRequest) -> T:
        for attempt in range(1, self.policy.max_attempts + 1):
            try:
                return await rpc(request, timeout=self.timeout_s, metadata=self._metadata)
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in _RETRYABLE_GRPC or attempt == self.policy.max_attempts:
                    raise RewardServiceError(exc.code().name, exc.details() or "") from exc
                await asyncio.sleep(self.policy.delay(attempt))
        raise AssertionError("unreachable: the loop returns or raises")

    def _request(self, samples: Sequence[Sample], rm_type: str, reward_key: str) -> slime_pb2.ScoreRequest:
        return slime_pb2.ScoreRequest(
            items=[reward_item(sample) for sample in samples], rm_type=rm_type, reward_key=reward_key
        )

    async def score(
        self, samples: Sequence[Sample], *, rm_type: str = "", reward_key: str = ""
    ) -> list[ScoredReward]:
        """Each sample scored on its own."""
        response = await self._call(self._stub.Score, self._request(samples, rm_type, reward_key))
        return [reward_from_proto(value) for value in response.rewards]

    async def score_group(
        self, samples: Sequence[Sample], *, rm_type: str = "", reward_key: str = ""
    ) -> list[ScoredReward]:
        """The samples scored as one group (the custom reward function sees them all at once)."""
        response = await self._call(self._stub.ScoreGroup, self._request(samples, rm_type, reward_key))
        return [reward_from_proto(value) for value in response.rewards]

    async def close(self) -> None:
        await self._channel.close()
