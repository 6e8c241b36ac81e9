"""The reward hub with a real grader pool: slime's reward types and precedence, failures that cost one item,
custom and group reward modules loaded by path, and remote_rm against real HTTP servers (retries, proxy)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import REGISTRY

from services.core.net import free_port
from services.core.plugins import PluginLoadError
from services.core.sample import Sample
from services.reward_model import hub as hub_module
from services.reward_model.client import RemoteRewardClient, RemoteRewardError, RetryPolicy
from services.reward_model.hub import (
    RewardConfigError,
    RewardHub,
    UnknownRewardType,
    async_rm,
    batched_async_rm,
    close_default_hub,
    select_reward,
)
from services.reward_model.pool import GraderPool
from services.reward_model.server import parse_args
from tests.reward_model import custom_rewards
from tests.reward_model.conftest import forward_proxy, serve_app

FAST_RETRIES = RetryPolicy(max_attempts=3, backoff_base_s=0.05, backoff_max_s=0.2, jitter_s=0.01)
HANGING_MATH = "\\boxed{99999999!/3}"  # sympy computes the factorial inside C code and never returns


def sample(response: str, label: str | None = None, **metadata: Any) -> Sample:
    return Sample(prompt="What is it?", response=response, label=label, metadata=metadata)


@pytest.fixture
async def pool() -> AsyncIterator[GraderPool]:
    # Started by its first item, so tests that never reach a rule-based grader start no processes.
    grader_pool = GraderPool(2, 1.0)
    yield grader_pool
    await grader_pool.close()


def failures(rm_type: str, reason: str) -> float:
    return (
        REGISTRY.get_sample_value("slime_reward_model_failures_total", {"rm_type": rm_type, "reason": reason})
        or 0.0
    )


async def test_rule_based_types_and_their_precedence(pool: GraderPool) -> None:
    hub = RewardHub(parse_args(["--rm-type", "math"]), pool=pool)
    right, wrong = sample("so \\boxed{\\dfrac{1}{2}}", "0.5"), sample("so \\boxed{2}", "0.5")
    assert [o.value for o in await hub.score_batch([right, wrong])] == [1, 0]
    # A request's rm_type overrides --rm-type; a sample's metadata["rm_type"] overrides both (slime's order).
    assert (await hub.score(sample("Answer: 7", "7"), rm_type="dapo")).value == {
        "score": 1.0,
        "acc": True,
        "pred": "7",
    }
    assert (await hub.score(sample("Paris", "Paris", rm_type="f1"), rm_type="dapo")).value == 1.0
    assert (await hub.score(sample("<think>..</think>\\boxed{3}", "3"), rm_type="deepscaler")).value == 1
    assert (await hub.score(sample("Rome and \\boxed{Paris}", "Paris"), rm_type="boxed_f1")).value == 1.0
    assert all(o.ok for o in await hub.score_group([right, wrong]))


async def test_configuration_errors_name_the_field(pool: GraderPool) -> None:
    hub = RewardHub(parse_args([]), pool=pool)
    with pytest.raises(RewardConfigError, match="--rm-type") as no_type:
        await hub.score(sample("x"))
    assert no_type.value.field == "rm_type"
    with pytest.raises(UnknownRewardType, match="valid: math, deepscaler, dapo, f1, remote_rm") as unknown:
        await hub.score(sample("x"), rm_type="gsm8k")
    assert unknown.value.field == "rm_type"
    with pytest.raises(UnknownRewardType) as in_metadata:
        await hub.score_batch([sample("x", rm_type="nope")], rm_type="math")
    assert in_metadata.value.field == "metadata.rm_type"
    with pytest.raises(RewardConfigError, match="--rm-url") as no_url:
        await hub.score(sample("x"), rm_type="remote_rm")
    assert no_url.value.field == "rm_url"
    with pytest.raises(RewardConfigError, match="not in the reward"):
        select_reward({"score": 1.0}, "acc_rate")
    assert select_reward({"score": 1.0}, "score") == 1.0
    assert select_reward(0.5, "score") == 0.5


async def test_failing_graders_cost_only_their_item(pool: GraderPool) -> None:
    hub = RewardHub(parse_args(["--rm-type", "math"]), pool=pool)
    timeouts, errors = failures("math", "timeout"), failures("dapo", "grader_error")
    start = time.perf_counter()
    outcomes = await hub.score_batch(
        [sample(HANGING_MATH, "2.5"), sample("\\boxed{4}", "4"), sample("\\boxed{5}", "4")]
    )
    assert time.perf_counter() - start < 5.0
    assert (
        outcomes[0].value == 0 and outcomes[0].error is not None and outcomes[0].error.startswith("timeout")
    )
    assert [o.value for o in outcomes[1:]] == [1, 0] and all(o.ok for o in outcomes[1:])
    # dapo's labels must be integers: the grader raises, the item gets dapo's "wrong" dict and the reason.
    (bad_label,) = await hub.score_batch([sample("Answer: 3", "three")], rm_type="dapo")
    assert bad_label.value == {"score": -1.0, "acc": False, "pred": ""}
    assert bad_label.error is not None and "integer label" in bad_label.error
    assert failures("math", "timeout") == timeouts + 1
    assert failures("dapo", "grader_error") == errors + 1
    assert (await hub.score(sample("\\boxed{1}", "1"))).value == 1


async def test_a_batch_takes_one_grader_round_trip_per_worker(pool: GraderPool) -> None:
    """Rule-based items of a batch are split over the pool's workers, one message each, not one per item; a chunk
    with an item that hangs or raises is graded again item by item, so that only that item fails."""
    hub = RewardHub(parse_args(["--rm-type", "math"]), pool=pool)

    def round_trips() -> float:
        return REGISTRY.get_sample_value("slime_reward_model_grade_seconds_count") or 0.0

    answers = [sample(f"\\boxed{{{k}}}", str(k if k % 3 else k + 1)) for k in range(16)]
    before = round_trips()
    outcomes = await hub.score_batch(answers)
    assert [o.value for o in outcomes] == [0 if k % 3 == 0 else 1 for k in range(16)]
    assert all(o.ok for o in outcomes)
    assert round_trips() - before == 2  # the pool has two workers
    assert [o.value for o in await hub.score_group(answers[:3])] == [0, 1, 1]

    mixed = [*answers[:5], sample(HANGING_MATH, "2.5"), sample("Answer: 3", "three", rm_type="dapo")]
    outcomes = await hub.score_batch(mixed)
    assert [o.value for o in outcomes[:5]] == [0, 1, 1, 0, 1] and all(o.ok for o in outcomes[:5])
    assert (
        outcomes[5].value == 0 and outcomes[5].error is not None and outcomes[5].error.startswith("timeout")
    )
    assert (
        outcomes[6].value == {"score": -1.0, "acc": False, "pred": ""}
        and "integer label" in outcomes[6].error
    )
    assert await hub.score_batch([]) == []


async def test_custom_reward_module_loaded_by_path(pool: GraderPool) -> None:
    path = "tests.reward_model.custom_rewards.exact_match"
    hub = RewardHub(parse_args(["--rm-type", "math", "--custom-rm-path", path]), pool=pool)
    # --custom-rm-path takes precedence over --rm-type, keyword arguments reach the function.
    outcome = await hub.score(sample("42", "42"), temperature=0.7)
    assert outcome.value == {"score": 1.0, "length": 2, "temperature": 0.7}
    assert [o.value["score"] for o in await hub.score_batch([sample("1", "2"), sample("2", "2")])] == [
        0.0,
        1.0,
    ]

    hub.args.custom_rm_path = "tests.reward_model.custom_rewards.sync_half"
    assert (await hub.score(sample("x"))).value == 0.5
    hub.args.custom_rm_path = "tests.reward_model.custom_rewards.explode"
    boom, fine = await hub.score_batch([sample("boom"), sample("calm")])
    assert boom.value == 0 and boom.error == "custom_error: RuntimeError: custom reward exploded"
    assert fine.value == 1.0 and fine.ok
    hub.args.custom_rm_path = "tests.reward_model.custom_rewards.not_a_number"
    assert (await hub.score(sample("x"))).error == "custom_bad_return: expected a number or a dict, got str"
    hub.args.custom_rm_path = "tests.reward_model.custom_rewards.missing"
    with pytest.raises(PluginLoadError, match="--custom-rm-path"):
        await hub.score(sample("x"))


async def test_custom_group_reward_module_sees_the_whole_group(pool: GraderPool) -> None:
    path = "tests.reward_model.custom_rewards.majority_vote"
    hub = RewardHub(parse_args(["--custom-rm-path", path, "--group-rm"]), pool=pool)
    group = [sample("4"), sample("4"), sample("5"), sample("4")]
    calls = len(custom_rewards.calls)
    assert [o.value for o in await hub.score_group(group)] == [0.75, 0.75, 0.25, 0.75]
    # With --group-rm a plain batch is one group too, and a single sample is a group of one.
    assert [o.value for o in await hub.score_batch(group[:3])] == pytest.approx([2 / 3, 2 / 3, 1 / 3])
    assert custom_rewards.calls[calls:] == [4, 3]

    hub.args.custom_rm_path = "tests.reward_model.custom_rewards.short_group"
    outcomes = await hub.score_group(group)
    assert all(o.value == 0 for o in outcomes)
    assert outcomes[0].error == "custom_bad_return: group reward function returned 1 values for 4 samples"


async def test_slime_entry_points_async_rm_and_batched_async_rm() -> None:
    args = parse_args(["--rm-type", "math", "--grader-timeout", "2"])
    try:
        assert await async_rm(args, sample("\\boxed{10}", "10")) == 1
        assert await batched_async_rm(args, [sample("\\boxed{1}", "1"), sample("\\boxed{1}", "2")]) == [1, 0]
        group_args = parse_args(["--custom-rm-path", "tests.reward_model.custom_rewards.majority_vote"])
        assert await batched_async_rm(group_args, [sample("a"), sample("b")]) == [0.5, 0.5]
        assert hub_module.default_hub(group_args).pool.timeout_s == 2.0
    finally:
        await close_default_hub()


def flaky_reward_app(failures_before_success: int) -> tuple[FastAPI, list[dict[str, Any]]]:
    """A reward server that answers 503 a few times, then echoes a dict reward; it records every request."""
    app = FastAPI()
    seen: list[dict[str, Any]] = []

    @app.post("/reward")
    async def reward(request: Request) -> JSONResponse:
        seen.append({"body": await request.json(), "auth": request.headers.get("authorization")})
        if len(seen) <= failures_before_success:
            return JSONResponse({"detail": "warming up"}, status_code=503)
        return JSONResponse({"score": 0.25, "attempt": len(seen)})

    @app.post("/bad")
    async def bad(request: Request) -> JSONResponse:
        seen.append({"body": await request.json()})
        return JSONResponse({"detail": "no label"}, status_code=422)

    @app.post("/text")
    async def text() -> PlainTextResponse:
        return PlainTextResponse("great answer")

    @app.post("/slow")
    async def slow() -> JSONResponse:
        await asyncio.sleep(0.5)
        return JSONResponse(1.0)

    return app, seen


async def test_remote_client_retries_with_backoff_but_not_on_client_errors() -> None:
    app, seen = flaky_reward_app(failures_before_success=2)
    async with serve_app(app) as base:
        client = RemoteRewardClient(f"{base}/reward", policy=FAST_RETRIES)
        start = time.perf_counter()
        assert await client.score({"prompt": "p", "response": "r", "label": "l"}) == {
            "score": 0.25,
            "attempt": 3,
        }
        assert time.perf_counter() - start >= 0.05 + 0.1  # two backoffs
        assert [s["body"] for s in seen] == [{"prompt": "p", "response": "r", "label": "l"}] * 3

        seen.clear()
        with pytest.raises(RemoteRewardError, match="HTTP 422"):
            await RemoteRewardClient(f"{base}/bad", policy=FAST_RETRIES).score({"prompt": "p"})
        assert len(seen) == 1
        with pytest.raises(RemoteRewardError, match="not JSON"):
            await RemoteRewardClient(f"{base}/text", policy=FAST_RETRIES).score({})
        with pytest.raises(RemoteRewardError, match="after 3 attempts"):
            await RemoteRewardClient(f"{base}/slow", policy=FAST_RETRIES, timeout_s=0.2).score({})
        await client.aclose()
    with pytest.raises(RemoteRewardError, match="ConnectError"):
        await RemoteRewardClient(f"http://127.0.0.1:{free_port()}/reward", policy=FAST_RETRIES).score({})


async def test_remote_rm_through_the_hub_and_the_http_proxy(pool: GraderPool) -> None:
    app, seen = flaky_reward_app(failures_before_success=1)
    async with serve_app(app) as base, forward_proxy() as (proxy_url, proxy):
        flags = ["--rm-type", "remote_rm", "--rm-url", f"{base}/reward", "--http-proxy", proxy_url]
        hub = RewardHub(parse_args([*flags, "--auth-token", "shared"]), pool=pool, remote_policy=FAST_RETRIES)
        outcome = await hub.score(Sample(prompt="Q?", response="A \\boxed{1}", label="1", metadata={"k": 1}))
        # slime's remote_rm answers the server's JSON verbatim and posts exactly prompt, response and label.
        assert outcome.value == {"score": 0.25, "attempt": 2} and outcome.ok
        assert seen[-1]["body"] == {"prompt": "Q?", "response": "A \\boxed{1}", "label": "1"}
        assert seen[-1]["auth"] == "Bearer shared"
        assert proxy.seen == [f"POST {base}/reward"] * 2
        await hub.aclose()

    unreachable = ["--rm-type", "remote_rm", "--rm-url", f"http://127.0.0.1:{free_port()}/reward"]
    async with GraderPool(1, 1.0) as other_pool:
        hub = RewardHub(parse_args(unreachable), pool=other_pool, remote_policy=FAST_RETRIES)
        down = await hub.score(sample("x", "y"))
        assert down.value == 0 and down.error is not None and down.error.startswith("remote_error")
        await hub.aclose()
