"""The reward-model service as real `slime serve reward-model` processes: slime's remote_rm contract over HTTP,
gRPC parity, remote_rm to a second instance, group rewards, hung graders, bad input, backpressure, shutdown."""

from __future__ import annotations

import asyncio
import re
import signal
from collections.abc import Iterator

import httpx
import pytest

from services.core.sample import Sample
from services.reward_model.client import (
    REWARD_ERROR_HEADER,
    RetryPolicy,
    RewardGrpcClient,
    RewardHttpClient,
    RewardServiceError,
)
from services.reward_model.server import parse_args
from tests.reward_model.conftest import (
    TOKEN,
    RewardServer,
    launch_reward_server,
    reward_servers,
    stop_reward_server,
    wait_gone,
    wait_ready,
)

HANG = "\\boxed{99999999!/3}"  # sympy computes this factorial inside C code and never returns
NO_RETRY = RetryPolicy(max_attempts=1)
AUTH = {"Authorization": f"Bearer {TOKEN}"}

# (response, label, rm_type) triples spanning every rule-based type.
TABLE = [
    ("so \\boxed{\\frac{1}{2}}", "0.5", "math"),
    ("so \\boxed{0.33}", "\\frac{1}{3}", "math"),
    ("so \\boxed{1,000}", "1000", "math"),
    ("no box", "3", "math"),
    ("<think>hmm</think> \\boxed{(1, 2]}", "(1,2]", "deepscaler"),
    ("\\boxed{4}", "4", "deepscaler"),
    ("work...\nAnswer: 42", "42", "dapo"),
    ("work...\nAnswer: 41", "42", "dapo"),
    ("the city of Paris", "Paris", "f1"),
    ("Rome, then \\boxed{Paris}", "Paris", "boxed_f1"),
]


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, RewardServer]]:
    """A: math grader (auth, small limits). B: remote_rm forwarding to A. C: a custom group reward."""
    logs = tmp_path_factory.mktemp("reward-servers")
    common = ("--auth-token", TOKEN, "--grader-timeout", "1")
    a_flags = (
        "--rm-type",
        "math",
        "--num-workers",
        "2",
        "--max-concurrency",
        "8",
        "--max-body-bytes",
        "65536",
    )
    # B forwards to A, so A is launched first; all three start up at the same time.
    a = launch_reward_server(logs, "a", *common, *a_flags)
    rest = [
        ("b", (*common, "--rm-type", "remote_rm", "--rm-url", f"{a.url}/reward", "--num-workers", "1")),
        ("c", ("--custom-rm-path", "tests.reward_model.custom_rewards.majority_vote", "--group-rm")),
    ]
    try:
        with reward_servers(logs, *rest) as (b, c):
            yield {"a": wait_ready(a), "b": b, "c": c}
    finally:
        stop_reward_server(a)


def items(rows: list[tuple[str, str, str]]) -> list[dict]:
    return [{"prompt": "Q", "response": response, "label": label} for response, label, _ in rows]


def samples(rows: list[tuple[str, str, str]]) -> list[Sample]:
    return [Sample(prompt="Q", response=response, label=label) for response, label, _ in rows]


def test_reward_answers_slime_remote_rm_with_a_bare_number(servers: dict[str, RewardServer]) -> None:
    url = servers["a"].url
    # Exactly what slime's remote_rm posts: no metadata, the reward comes back as the whole JSON body.
    right = httpx.post(
        f"{url}/reward", json={"prompt": "Q", "response": "\\boxed{\\dfrac34}", "label": "0.75"}, headers=AUTH
    )
    wrong = httpx.post(
        f"{url}/reward", json={"prompt": "Q", "response": "\\boxed{3/5}", "label": "0.75"}, headers=AUTH
    )
    assert (right.status_code, right.json(), wrong.json()) == (200, 1, 0)
    assert right.headers["x-request-id"] and REWARD_ERROR_HEADER not in right.headers
    chat = {"prompt": [{"role": "user", "content": "Q"}], "response": "Answer: 5", "label": "5"}
    dapo = httpx.post(f"{url}/reward", json={**chat, "metadata": {"rm_type": "dapo"}}, headers=AUTH)
    assert dapo.json() == {"score": 1.0, "acc": True, "pred": "5"}


def test_batch_and_grpc_give_identical_scores(servers: dict[str, RewardServer]) -> None:
    async def scenario() -> None:
        http = RewardHttpClient(servers["a"].url, auth_token=TOKEN)
        grpc_client = RewardGrpcClient(servers["a"].grpc_addr, auth_token=TOKEN)
        try:
            for rm_type in sorted({row[2] for row in TABLE}):
                rows = [row for row in TABLE if row[2] == rm_type]
                via_http = await http.score_batch(samples(rows), rm_type=rm_type)
                via_grpc = await grpc_client.score(samples(rows), rm_type=rm_type)
                assert [r.value for r in via_http] == [r.value for r in via_grpc], rm_type
                assert all(r.ok for r in via_http + via_grpc)
            dapo_rows = [row for row in TABLE if row[2] == "dapo"]
            by_key = await http.score_batch(samples(dapo_rows), rm_type="dapo", reward_key="score")
            by_key_grpc = await grpc_client.score(samples(dapo_rows), rm_type="dapo", reward_key="score")
            assert [r.value for r in by_key] == [r.value for r in by_key_grpc] == [1.0, -1.0]
            math_rows = [row for row in TABLE if row[2] == "math"]
            assert [r.value for r in await http.score_batch(samples(math_rows))] == [1, 0, 1, 0]
            single = [await http.score(s) for s in samples(math_rows)]
            assert [r.value for r in single] == [1, 0, 1, 0]
        finally:
            await http.aclose()
            await grpc_client.close()

    asyncio.run(scenario())


def test_remote_rm_through_a_second_instance(servers: dict[str, RewardServer]) -> None:
    a, b = servers["a"], servers["b"]
    math_rows = [row for row in TABLE if row[2] == "math"]
    direct = httpx.post(f"{a.url}/reward/batch", json={"items": items(math_rows)}, headers=AUTH).json()
    forwarded = httpx.post(f"{b.url}/reward/batch", json={"items": items(math_rows)}, headers=AUTH).json()
    assert forwarded == direct == {"rewards": [1, 0, 1, 0], "errors": [None] * 4}

    async def over_grpc() -> list[float]:
        client = RewardGrpcClient(b.grpc_addr, auth_token=TOKEN)
        try:
            return [r.value for r in await client.score(samples(math_rows))]
        finally:
            await client.close()

    assert asyncio.run(over_grpc()) == [1, 0, 1, 0]


def test_group_reward_over_http_and_grpc(servers: dict[str, RewardServer]) -> None:
    c = servers["c"]
    group = [("4", "", "custom"), ("4", "", "custom"), ("5", "", "custom"), ("4", "", "custom")]
    body = httpx.post(f"{c.url}/reward/batch", json={"items": items(group), "group": True}).json()
    assert body == {"rewards": [0.75, 0.75, 0.25, 0.75], "errors": [None] * 4}
    assert httpx.post(f"{c.url}/reward", json={"prompt": "Q", "response": "4"}).json() == 1.0

    async def over_grpc() -> tuple[list[float], list[float]]:
        client = RewardGrpcClient(c.grpc_addr)
        try:
            grouped = await client.score_group(samples(group))
            batched = await client.score(samples(group[:2]))
            return [r.value for r in grouped], [r.value for r in batched]
        finally:
            await client.close()

    assert asyncio.run(over_grpc()) == ([0.75, 0.75, 0.25, 0.75], [1.0, 1.0])


def test_hung_grader_times_out_while_the_rest_of_the_batch_succeeds(servers: dict[str, RewardServer]) -> None:
    url = servers["a"].url
    batch = [{"prompt": "Q", "response": HANG, "label": "2.5"}] + items(TABLE[:3])
    answer = httpx.post(f"{url}/reward/batch", json={"items": batch}, headers=AUTH, timeout=30)
    assert answer.status_code == 200
    body = answer.json()
    assert body["rewards"] == [0, 1, 0, 1]
    assert body["errors"][0].startswith("timeout:") and body["errors"][1:] == [None] * 3
    single = httpx.post(f"{url}/reward", json=batch[0], headers=AUTH, timeout=30)
    assert single.json() == 0 and single.headers[REWARD_ERROR_HEADER].startswith("timeout:")
    # The service keeps answering, with its pool back to full strength.
    assert httpx.get(f"{url}/health").json() == {"status": "ok", "service": "reward-model"}
    again = httpx.post(f"{url}/reward/batch", json={"items": items(TABLE[:3]) * 2}, headers=AUTH)
    assert again.json()["rewards"] == [1, 0, 1] * 2
    metrics = httpx.get(f"{url}/metrics").text
    assert re.search(r'slime_reward_model_failures_total\{reason="timeout",rm_type="math"\} [2-9]', metrics)
    assert re.search(r'slime_reward_model_pool_worker_restarts_total\{reason="timeout"\} [2-9]', metrics)
    assert re.search(r'slime_reward_model_items_total\{outcome="ok",rm_type="math"\} \d+', metrics)
    assert re.search(r'slime_reward_model_reward_bucket\{le="0.0",rm_type="math"\} [1-9]', metrics)
    assert (
        "slime_reward_model_item_seconds_bucket" in metrics
        and "slime_reward_model_grade_seconds_sum" in metrics
    )


def test_bad_input_is_refused_with_the_field_at_fault(servers: dict[str, RewardServer]) -> None:
    url = servers["a"].url
    missing = httpx.post(f"{url}/reward", json={"prompt": "Q", "label": "1"}, headers=AUTH)
    assert missing.status_code == 422 and missing.json()["error"]["field"] == "response"
    wrong_type = httpx.post(f"{url}/reward", json={"prompt": "Q", "response": ["a"]}, headers=AUTH)
    assert wrong_type.status_code == 422 and wrong_type.json()["error"]["field"] == "response"
    bad_item = httpx.post(f"{url}/reward/batch", json={"items": [{"prompt": "Q", "label": 1}]}, headers=AUTH)
    assert bad_item.status_code == 422 and bad_item.json()["error"]["field"] == "items.0.response"
    unknown = httpx.post(
        f"{url}/reward/batch", json={"items": items(TABLE[:1]), "rm_type": "gsm8k"}, headers=AUTH
    )
    assert unknown.status_code == 400 and unknown.json()["error"]["field"] == "rm_type"
    assert "valid: math, deepscaler, dapo, f1, remote_rm" in unknown.json()["error"]["message"]
    bad_key = httpx.post(
        f"{url}/reward/batch",
        json={"items": items(TABLE[6:7]), "rm_type": "dapo", "reward_key": "nope"},
        headers=AUTH,
    )
    assert bad_key.status_code == 400 and bad_key.json()["error"]["field"] == "reward_key"
    huge = httpx.post(
        f"{url}/reward", json={"prompt": "Q", "response": "x" * 70_000, "label": "1"}, headers=AUTH
    )
    assert huge.status_code == 413
    too_many = httpx.post(f"{url}/reward/batch", json={"items": items(TABLE[:1]) * 9}, headers=AUTH)
    assert too_many.status_code == 413 and too_many.json()["error"]["field"] == "items"
    assert httpx.post(f"{url}/reward", json={"prompt": "Q", "response": "r"}).status_code == 401

    async def over_grpc() -> tuple[str | int, str | int]:
        anonymous = RewardGrpcClient(servers["a"].grpc_addr, policy=NO_RETRY)
        client = RewardGrpcClient(servers["a"].grpc_addr, auth_token=TOKEN, policy=NO_RETRY)
        statuses = []
        for grpc_client, rm_type in ((anonymous, ""), (client, "gsm8k")):
            with pytest.raises(RewardServiceError) as failure:
                await grpc_client.score(samples(TABLE[:1]), rm_type=rm_type)
            statuses.append(failure.value.status)
            await grpc_client.close()
        return statuses[0], statuses[1]

    assert asyncio.run(over_grpc()) == ("UNAUTHENTICATED", "INVALID_ARGUMENT")


def inflight_items(url: str) -> float:
    match = re.search(
        r"^slime_reward_model_inflight_items ([0-9.]+)$", httpx.get(f"{url}/metrics").text, re.M
    )
    return float(match.group(1)) if match else 0.0


def test_overload_is_answered_429_not_queued(servers: dict[str, RewardServer]) -> None:
    a = servers["a"]
    hanging = [{"prompt": "Q", "response": HANG, "label": "2.5"}] * 3  # ~2 s in flight on 2 workers

    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=a.url, headers=AUTH, timeout=30) as client:
            hung = asyncio.ensure_future(client.post("/reward/batch", json={"items": hanging}))
            for _ in range(200):
                if inflight_items(a.url) >= 3:
                    break
                await asyncio.sleep(0.02)
            # 3 of the 8 slots are taken: 6 more items are refused at once, not queued.
            refused = await client.post("/reward/batch", json={"items": items(TABLE[:1]) * 6})
            assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
            grpc_client = RewardGrpcClient(a.grpc_addr, auth_token=TOKEN, policy=NO_RETRY)
            with pytest.raises(RewardServiceError) as failure:
                await grpc_client.score(samples(TABLE[:1]) * 6)
            assert failure.value.status == "RESOURCE_EXHAUSTED"
            await grpc_client.close()
            assert (await hung).json()["rewards"] == [0, 0, 0]
            accepted = await client.post("/reward/batch", json={"items": items(TABLE[:1]) * 8})
            assert accepted.status_code == 200 and accepted.json()["rewards"] == [1] * 8
        metrics = httpx.get(f"{a.url}/metrics").text
        assert re.search(r'slime_reward_model_rejected_total\{protocol="http"\} [1-9]', metrics)
        assert re.search(r'slime_reward_model_rejected_total\{protocol="grpc"\} [1-9]', metrics)

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--rm-type", "gsm8k"], "--rm-type: unknown reward type 'gsm8k'"),
        (["--rm-type", "remote_rm"], "--rm-type remote_rm needs --rm-url"),
        (["--rm-url", "localhost:8000"], "--rm-url must be an http(s) URL"),
        (["--custom-rm-path", "tests.reward_model.custom_rewards.nothing"], "--custom-rm-path"),
        (["--num-workers", "0"], "--num-workers must be at least 1"),
        (["--port", "9000", "--grpc-port", "9000"], "--grpc-port must differ from --port"),
        (["--grader-timeout", "0"], "--grader-timeout must be positive"),
    ],
)
def test_flag_errors_name_the_flag(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_defaults_and_graceful_shutdown(servers: dict[str, RewardServer]) -> None:
    args = parse_args([])
    assert (args.port, args.grpc_port, args.max_concurrency) == (8000, 8001, 1024)
    assert parse_args(["--port", "7000"]).grpc_port == 7001
    a = servers["a"]
    pool_line = re.search(r"grader pool up: 2 workers \[(\d+), (\d+)\]", a.log_text())
    assert pool_line, a.log_text()
    # uvicorn finishes its graceful shutdown, then re-raises the SIGTERM it caught, as Kubernetes expects.
    assert stop_reward_server(a) in (0, -signal.SIGTERM)
    assert wait_gone([int(pid) for pid in pool_line.groups()])
    log = a.log_text()
    assert "grader pool closed" in log and "Application shutdown complete" in log
