"""slime's reward hub (``slime.rollout.rm_hub``) with its semantics, the rule-based graders isolated in a process pool.

``async_rm(args, sample)`` and ``batched_async_rm(args, samples)`` are drop-in replacements for slime's; the service
uses ``RewardHub`` directly, which also reports why an item's grading failed.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import time
from collections.abc import Callable, Sequence
from numbers import Real
from typing import Any

from prometheus_client import Counter, Histogram

from services.core.plugins import load_function
from services.core.sample import Sample
from services.reward_model.client import RemoteRewardClient, RemoteRewardError, RetryPolicy, ScoredReward
from services.reward_model.graders import RULE_BASED, Reward, failure_reward, grade, grade_many, split_boxed
from services.reward_model.pool import GraderFailed, GraderPool, GraderTimeout, PoolClosed

logger = logging.getLogger(__name__)

REMOTE_RM = "remote_rm"
CUSTOM = "custom"
VALID_RM_TYPES: tuple[str, ...] = (*RULE_BASED, REMOTE_RM)
DEFAULT_GRADER_TIMEOUT_S = 10.0

ITEMS = Counter(
    "slime_reward_model_items_total",
    "Items scored, by reward type and outcome (ok, failed).",
    ["rm_type", "outcome"],
)
FAILURES = Counter(
    "slime_reward_model_failures_total",
    "Items whose scoring failed and got the failure reward, by reward type and reason.",
    ["rm_type", "reason"],
)
ITEM_SECONDS = Histogram(
    "slime_reward_model_item_seconds",
    "Time to score one item (queueing for a grader worker included), by reward type.",
    ["rm_type"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
REWARDS = Histogram(
    "slime_reward_model_reward",
    "Scalar rewards given (the --reward-key field of dict rewards), by reward type.",
    ["rm_type"],
    buckets=(-1.0, -0.5, 0.0, 0.25, 0.5, 0.75, 1.0),
)


class RewardConfigError(ValueError):
    """The reward configuration (a flag or a request field, named by ``field``) cannot score this item."""

    def __init__(self, message: str, *, field: str):
        super().__init__(message)
        self.field = field


class UnknownRewardType(RewardConfigError):
    def __init__(self, rm_type: str, *, field: str = "rm_type"):
        super().__init__(
            f"unknown reward type {rm_type!r}; valid: {', '.join(VALID_RM_TYPES)} "
            f"(each also with the prefix boxed_), or set --custom-rm-path",
            field=field,
        )


def check_rm_type(rm_type: str, *, field: str = "rm_type") -> str:
    """``rm_type`` itself when it names a built-in reward (``boxed_`` prefix allowed); else UnknownRewardType."""
    _, base = split_boxed(rm_type)
    if base not in VALID_RM_TYPES:
        raise UnknownRewardType(rm_type, field=field)
    return rm_type


def select_reward(reward: Reward, reward_key: str | None, *, field: str = "reward_key") -> Reward:
    """``reward[reward_key]`` for a dict reward when a key is given (slime's ``--reward-key``); else ``reward``."""
    if not reward_key or not isinstance(reward, dict):
        return reward
    if reward_key not in reward:
        raise RewardConfigError(
            f"reward key {reward_key!r} is not in the reward; its keys are {sorted(reward)}", field=field
        )
    return reward[reward_key]


def default_num_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def _is_reward(value: Any) -> bool:
    return isinstance(value, dict) or (isinstance(value, Real) and not isinstance(value, bool))


class RewardHub:
    """Scores samples as slime's rm_hub does, with the rule-based graders in ``pool`` under its timeout.

    A grader that times out, raises or dies, a custom reward function that raises, and a remote reward server
    that stays unreachable all cost only that item: it gets ``failure_reward`` and the reason, counted in the
    metrics. A configuration error (unknown type, missing --rm-url) raises ``RewardConfigError`` instead.
    """

    def __init__(self, args: Any, *, pool: GraderPool, remote_policy: RetryPolicy | None = None):
        self.args = args
        self.pool = pool
        self.remote_policy = remote_policy or RetryPolicy()
        self._custom: dict[str, Callable[..., Any]] = {}
        self._remote: dict[tuple[str, str | None], RemoteRewardClient] = {}

    def custom_function(self) -> Callable[..., Any] | None:
        path = getattr(self.args, "custom_rm_path", None)
        if not path:
            return None
        if path not in self._custom:
            self._custom[path] = load_function(path, flag="--custom-rm-path")
        return self._custom[path]

    def resolve_type(self, sample: Sample, rm_type: str | None = None) -> str:
        """The reward that scores ``sample``: ``custom`` when --custom-rm-path is set (slime's precedence), else
        the sample's ``metadata["rm_type"]``, else ``rm_type``, else ``--rm-type``."""
        if self.custom_function() is not None:
            return CUSTOM
        metadata = sample.metadata if isinstance(sample.metadata, dict) else {}
        from_metadata = metadata.get("rm_type")
        if from_metadata:
            return check_rm_type(str(from_metadata).strip(), field="metadata.rm_type")
        chosen = (rm_type or getattr(self.args, "rm_type", None) or "").strip()
        if not chosen:
            raise RewardConfigError(
                "no reward type: pass --rm-type (or rm_type in the request) or --custom-rm-path",
                field="rm_type",
            )
        resolved = check_rm_type(chosen)
        if split_boxed(resolved)[1] == REMOTE_RM and not getattr(self.args, "rm_url", None):
            raise RewardConfigError("reward type remote_rm needs --rm-url", field="rm_url")
        return resolved

    async def score(self, sample: Sample, *, rm_type: str | None = None, **kwargs: Any) -> ScoredReward:
        """slime's ``async_rm``: one sample, the custom function called with that sample alone."""
        resolved = self.resolve_type(sample, rm_type)
        custom = self.custom_function()
        start = time.perf_counter()
        if custom is not None:
            outcome = await self._custom_single(custom, sample, kwargs)
        elif split_boxed(resolved)[1] == REMOTE_RM:
            outcome = await self._remote_single(sample)
        else:
            outcome = await self._rule_based(resolved, sample)
        self._record(resolved, outcome, time.perf_counter() - start)
        return outcome

    async def score_batch(
        self, samples: Sequence[Sample], *, rm_type: str | None = None, **kwargs: Any
    ) -> list[ScoredReward]:
        """Each sample on its own; with --group-rm the custom function is a group function and sees the batch."""
        if getattr(self.args, "group_rm", False) and self.custom_function() is not None:
            return await self.score_group(samples, **kwargs)
        return await self._each(samples, rm_type, kwargs)

    async def score_group(
        self, samples: Sequence[Sample], *, rm_type: str | None = None, **kwargs: Any
    ) -> list[ScoredReward]:
        """slime's ``batched_async_rm``: the custom function called once with the list, else each sample alone."""
        custom = self.custom_function()
        if custom is None:
            return await self._each(samples, rm_type, kwargs)
        start = time.perf_counter()
        outcomes = await self._custom_group(custom, list(samples), kwargs)
        elapsed = time.perf_counter() - start
        for outcome in outcomes:
            self._record(CUSTOM, outcome, elapsed)
        return outcomes

    async def _each(
        self, samples: Sequence[Sample], rm_type: str | None, kwargs: dict[str, Any]
    ) -> list[ScoredReward]:
        """Each sample scored on its own; rule-based ones in as few grader round trips as there are workers."""
        types = [self.resolve_type(sample, rm_type) for sample in samples]
        if self.custom_function() is not None or any(split_boxed(t)[1] == REMOTE_RM for t in types):
            return list(await asyncio.gather(*(self.score(s, rm_type=rm_type, **kwargs) for s in samples)))
        outcomes: list[ScoredReward | None] = [None] * len(samples)
        chunks = min(self.pool.num_workers, len(samples))

        async def grade_chunk(indices: list[int]) -> None:
            start = time.perf_counter()
            items = [(types[i], samples[i].response or "", samples[i].label) for i in indices]
            try:
                values = await self.pool.run(grade_many, items)
                scored = [ScoredReward(value) for value in values]
            except (GraderTimeout, GraderFailed):
                # An item of the chunk hung or raised: grade each alone, so that only that one fails.
                for i in indices:
                    outcomes[i] = await self.score(samples[i], rm_type=types[i])
                return
            except PoolClosed as exc:
                scored = [ScoredReward(failure_reward(types[i]), f"shutting_down: {exc}") for i in indices]
            seconds = (time.perf_counter() - start) / len(indices)
            for i, outcome in zip(indices, scored, strict=True):
                self._record(types[i], outcome, seconds)
                outcomes[i] = outcome

        await asyncio.gather(*(grade_chunk(list(range(c, len(samples), chunks))) for c in range(chunks)))
        return outcomes  # type: ignore[return-value]

    async def _rule_based(self, rm_type: str, sample: Sample) -> ScoredReward:
        try:
            value = await self.pool.run(grade, rm_type, sample.response or "", sample.label)
        except GraderTimeout as exc:
            return ScoredReward(failure_reward(rm_type), f"timeout: {exc}")
        except GraderFailed as exc:
            return ScoredReward(failure_reward(rm_type), f"{exc.reason}: {exc}")
        except PoolClosed as exc:
            return ScoredReward(failure_reward(rm_type), f"shutting_down: {exc}")
        return ScoredReward(value)

    async def _remote_single(self, sample: Sample) -> ScoredReward:
        url = self.args.rm_url
        proxy = getattr(self.args, "http_proxy", None)
        client = self._remote.get((url, proxy))
        if client is None:
            # --auth-token is the bearer token this deployment's services share, so it goes to the remote too.
            client = self._remote[(url, proxy)] = RemoteRewardClient(
                url, proxy=proxy, policy=self.remote_policy, auth_token=getattr(self.args, "auth_token", None)
            )
        # slime posts the whole sample's fields, even under boxed_remote_rm.
        payload = {"prompt": sample.prompt, "response": sample.response, "label": sample.label}
        try:
            return ScoredReward(await client.score(payload))
        except RemoteRewardError as exc:
            return ScoredReward(0, f"remote_error: {exc}")

    async def _custom_single(
        self, custom: Callable[..., Any], sample: Sample, kwargs: dict[str, Any]
    ) -> ScoredReward:
        try:
            value = await _call(custom, self.args, sample, **kwargs)
        except Exception as exc:
            logger.warning("custom reward function raised on sample %s: %r", getattr(sample, "uid", "?"), exc)
            return ScoredReward(0, f"custom_error: {type(exc).__name__}: {exc}")
        if not _is_reward(value):
            return ScoredReward(
                0, f"custom_bad_return: expected a number or a dict, got {type(value).__name__}"
            )
        return ScoredReward(value)

    async def _custom_group(
        self, custom: Callable[..., Any], samples: list[Sample], kwargs: dict[str, Any]
    ) -> list[ScoredReward]:
        try:
            values = await _call(custom, self.args, samples, **kwargs)
        except Exception as exc:
            logger.warning("custom group reward function raised on %d samples: %r", len(samples), exc)
            return [ScoredReward(0, f"custom_error: {type(exc).__name__}: {exc}") for _ in samples]
        if not isinstance(values, list | tuple) or len(values) != len(samples):
            got = f"{len(values)} values" if isinstance(values, list | tuple) else type(values).__name__
            reason = f"custom_bad_return: group reward function returned {got} for {len(samples)} samples"
            return [ScoredReward(0, reason) for _ in samples]
        return [
            ScoredReward(v)
            if _is_reward(v)
            else ScoredReward(0, f"custom_bad_return: got {type(v).__name__}")
            for v in values
        ]

    def _record(self, rm_type: str, outcome: ScoredReward, seconds: float) -> None:
        ITEM_SECONDS.labels(rm_type).observe(seconds)
        if outcome.error is not None:
            ITEMS.labels(rm_type, "failed").inc()
            FAILURES.labels(rm_type, outcome.error.split(":", 1)[0]).inc()
            return
        ITEMS.labels(rm_type, "ok").inc()
        value = outcome.value
        if isinstance(value, dict):
            value = value.get(getattr(self.args, "reward_key", None) or "", None)
        if isinstance(value, Real) and not isinstance(value, bool):
            REWARDS.labels(rm_type).observe(float(value))

    async def aclose(self) -> None:
        """Close the remote-reward clients and the grader pool."""
        for client in self._remote.values():
            await client.aclose()
        self._remote.clear()
        await self.pool.close()


async def _call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    # slime's reward functions are async; a plain function is accepted as well.
    result = fn(*args, **kwargs)
    if inspect.isawaitable(result):
        result = await result
    return result


_default_hub: RewardHub | None = None


def default_hub(args: Any) -> RewardHub:
    """The process-wide hub behind ``async_rm``; its grader pool starts on first use and follows ``args``."""
    global _default_hub
    if _default_hub is None:
        timeout = getattr(args, "grader_timeout", None) or DEFAULT_GRADER_TIMEOUT_S
        _default_hub = RewardHub(args, pool=GraderPool(default_num_workers(), timeout))
    _default_hub.args = args
    return _default_hub


async def close_default_hub() -> None:
    """Stop the process-wide hub's grader workers (a rollout worker calls this on shutdown)."""
    global _default_hub
    if _default_hub is not None:
        hub, _default_hub = _default_hub, None
        await hub.aclose()


async def async_rm(args: Any, sample: Sample, **kwargs: Any) -> Reward:
    """slime's ``async_rm``: the reward of one sample (a number, or a dict for dapo and some custom functions)."""
    return (await default_hub(args).score(sample, **kwargs)).value


async def batched_async_rm(args: Any, samples: list[Sample], **kwargs: Any) -> list[Reward]:
    """slime's ``batched_async_rm``: --custom-rm-path called once with the list, else ``async_rm`` per sample."""
    return [outcome.value for outcome in await default_hub(args).score_group(samples, **kwargs)]
