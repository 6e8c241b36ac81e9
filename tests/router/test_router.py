"""The router end to end: a real router on loopback in front of EchoUpstream engine processes, with a real Redis.
Engines are killed with SIGKILL, hung, restarted with old weights; no client request may fail or hang."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.router.conftest import SteadyLoad, post_many

INTERVAL_PLUS_TIMEOUT = (
    1.0  # the fixtures' --rollout-health-check-interval 0.5 + --rollout-health-check-timeout 0.5
)


def generate(url: str, text: str, max_new_tokens: int = 8, **extra: object) -> httpx.Response:
    body = {"text": text, "sampling_params": {"max_new_tokens": max_new_tokens}, **extra}
    return httpx.post(f"{url}/generate", json=body, timeout=30)


def test_management_api_proxying_and_bad_input(start_router, echo_upstreams) -> None:
    first, second = echo_upstreams(2)
    router = start_router("--policy", "round_robin")
    added = httpx.post(f"{router.url}/add_worker", params={"url": first.url + "/"}).json()
    assert added["url"] == first.url and added["state"] == "HEALTHY" and added["created"]
    # slime's form: the URL in a JSON body.
    assert httpx.post(f"{router.url}/add_worker", json={"url": second.url}).json()["state"] == "HEALTHY"
    assert httpx.get(f"{router.url}/list_workers").json() == {"urls": [first.url, second.url]}

    answers = [generate(router.url, "hello world", max_new_tokens=5) for _ in range(4)]
    assert [a.json()["text"] for a in answers] == ["hello"] * 4
    assert Counter(a.headers["x-slime-worker"] for a in answers) == {first.url: 2, second.url: 2}
    # Other paths and methods are proxied too.
    assert httpx.get(f"{router.url}/get_weight_version").json() == {"weight_version": "0"}

    bad = httpx.post(f"{router.url}/add_worker", params={"url": "localhost:30001"})
    assert bad.status_code == 400
    assert bad.json()["error"]["field"] == "url" and "localhost:30001" in bad.json()["error"]["message"]
    assert httpx.post(f"{router.url}/add_worker").status_code == 400
    assert httpx.post(f"{router.url}/add_worker", content=b"{not json").status_code == 400
    unknown = httpx.post(f"{router.url}/remove_worker", params={"url": "http://127.0.0.1:9"})
    assert unknown.status_code == 404 and "http://127.0.0.1:9" in unknown.json()["error"]["message"]
    no_version = httpx.post(f"{router.url}/set_weight_version", json={"version": "3"})
    assert no_version.status_code == 422 and no_version.json()["error"]["field"] == "weight_version"
    assert httpx.post(f"{router.url}/set_weight_version", json={"weight_version": " "}).status_code == 422
    assert httpx.get(f"{router.url}/add_worker").status_code == 405

    workers = router.workers()
    assert workers[first.url]["requests"] + workers[second.url]["requests"] == 5
    assert workers[first.url]["state"] == "HEALTHY"
    assert workers[first.url]["weight_version"] == "0" and workers[first.url]["load"] == 0
    metrics = {
        (sample.name, sample.labels.get("worker"), sample.labels.get("state")): sample.value
        for family in text_string_to_metric_families(httpx.get(f"{router.url}/metrics").text)
        for sample in family.samples
    }
    assert metrics[("slime_router_requests_total", first.url, None)] >= 2
    assert metrics[("slime_router_worker_state", first.url, "HEALTHY")] == 1.0
    assert metrics[("slime_router_worker_state", first.url, "DEAD")] == 0.0

    assert httpx.post(f"{router.url}/remove_worker", params={"url": first.url}).status_code == 200
    assert httpx.post(f"{router.url}/remove_worker", params={"url": second.url}).status_code == 200
    started = time.monotonic()
    refused = generate(router.url, "anyone?")
    assert refused.status_code == 503 and time.monotonic() - started < 1.0
    assert "no workers are registered" in refused.json()["error"]["message"]


def test_streaming_chunks_arrive_before_the_response_ends(start_router, echo_upstreams) -> None:
    (upstream,) = echo_upstreams(1, token_latency=0.25)
    router = start_router("--worker-urls", upstream.url)
    router.wait_state(upstream.url, "HEALTHY")
    body = {"text": "abcdef", "stream": True, "sampling_params": {"max_new_tokens": 6}}
    arrivals = []
    started = time.monotonic()
    with httpx.stream("POST", f"{router.url}/generate", json=body, timeout=30) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                arrivals.append((time.monotonic() - started, line))
    ended = time.monotonic() - started
    assert arrivals[-1][1] == "data: [DONE]" and '"text":"abcdef"' in arrivals[-2][1]
    assert '"text":"a"' in arrivals[0][1]
    # Six tokens at 0.25 s: the first chunk comes about a second before the last.
    assert arrivals[0][0] < ended - 0.75


def test_kill9_under_load_loses_nothing_then_restart_is_stale_until_it_has_the_weights(
    start_router, echo_upstreams
) -> None:
    upstreams = echo_upstreams(3, weight_version=1, latency=0.01)
    victim = upstreams[0]
    router = start_router("--policy", "least_load", "--worker-urls", *(u.url for u in upstreams))
    for upstream in upstreams:
        router.wait_state(upstream.url, "HEALTHY")
    assert httpx.post(f"{router.url}/set_weight_version", json={"weight_version": "1"}).status_code == 200

    with SteadyLoad(router.url, concurrency=12) as load:
        load.wait_answers(100)
        killed_at = time.time()
        victim.kill9()
        dead = router.wait_state(victim.url, "DEAD", timeout=5)
        assert dead["state_since"] - killed_at <= INTERVAL_PLUS_TIMEOUT
        load.wait_answers(100)

        # Back on the same port with the weights it was started with: reachable, healthy, but behind.
        victim.spawn(weight_version=0).wait_ready()
        stale = router.wait_state(victim.url, "STALE", timeout=5)
        assert stale["weight_version"] == "0"
        load.wait_answers(150)
        assert victim.stats()["requests"] == 0, "a STALE worker got traffic"

        # The trainer pushes the weights (SGLang's /update_weight_version): it catches up and serves again.
        httpx.post(f"{victim.url}/update_weight_version", json={"new_version": "1"})
        router.wait_state(victim.url, "HEALTHY", timeout=5)
        load.wait_answers(100)
        assert victim.stats()["requests"] > 0

    assert load.failures == []
    workers = router.workers()
    assert workers[victim.url]["errors_total"] >= 1
    assert sum(worker["retries"] for worker in workers.values()) >= 1


def test_a_hung_engine_is_declared_dead_and_its_requests_move(start_router, echo_upstreams) -> None:
    hung, healthy = echo_upstreams(2)
    router = start_router("--policy", "round_robin", "--worker-urls", hung.url, healthy.url)
    router.wait_state(hung.url, "HEALTHY")
    router.wait_state(healthy.url, "HEALTHY")
    # Silent hang: connections are accepted, nothing is ever answered (requests, health checks).
    hung.control(latency=120, health="hang")

    body = {"text": "still there?", "sampling_params": {"max_new_tokens": 5}}
    started = time.monotonic()
    answers = asyncio.run(post_many(f"{router.url}/generate", [body] * 6))
    elapsed = time.monotonic() - started
    assert [a.status for a in answers] == [200] * 6
    assert {a.headers["x-slime-worker"] for a in answers} == {healthy.url}
    # Found within interval + timeout of the first failed probe (+ its confirmation), not after 120 s.
    assert elapsed < 4 * INTERVAL_PLUS_TIMEOUT
    assert router.workers()[hung.url]["state"] == "DEAD"
    assert router.workers()[hung.url]["retries"] >= 1


def test_registry_survives_a_router_restart_and_is_shared_by_two_replicas(
    start_router, echo_upstreams
) -> None:
    first, second = echo_upstreams(2)
    replica_a = start_router()
    for upstream in (first, second):
        httpx.post(f"{replica_a.url}/add_worker", params={"url": upstream.url})
    httpx.post(f"{replica_a.url}/set_weight_version", json={"weight_version": "0"})

    replica_b = start_router()
    assert httpx.get(f"{replica_b.url}/list_workers").json() == {"urls": [first.url, second.url]}
    replica_b.wait_state(first.url, "HEALTHY")
    assert generate(replica_b.url, "via b").status_code == 200
    assert httpx.get(f"{replica_b.url}/workers").json()["weight_version"] == "0"
    # Exactly one replica probes.
    assert [replica_a.workers_view()["prober"], replica_b.workers_view()["prober"]].count(True) == 1

    first.kill9()
    replica_a.wait_state(first.url, "DEAD")
    replica_b.wait_state(first.url, "DEAD")
    assert httpx.post(f"{replica_b.url}/remove_worker", params={"url": first.url}).status_code == 200
    assert httpx.get(f"{replica_a.url}/list_workers").json() == {"urls": [second.url]}

    replica_a.stop()
    restarted = start_router()
    assert httpx.get(f"{restarted.url}/list_workers").json() == {"urls": [second.url]}
    restarted.wait_state(second.url, "HEALTHY")
    assert generate(restarted.url, "after restart", max_new_tokens=5).json()["text"] == "after"


def test_a_thousand_concurrent_requests_and_a_group_on_one_worker(start_router, echo_upstreams) -> None:
    # The prompts share a prefix, so cache_aware keeps them on one worker until its in-flight load is out of
    # balance; answers that take 0.5 s make that happen however fast or slow the host serves them.
    upstreams = echo_upstreams(3, latency=0.5)
    # Probes get more time here: a thousand requests at once keep the engines' event loops busy.
    router = start_router(
        "--policy",
        "cache_aware",
        "--rollout-health-check-timeout",
        "10",
        "--worker-urls",
        *(u.url for u in upstreams),
    )
    for upstream in upstreams:
        router.wait_state(upstream.url, "HEALTHY")

    prompts = [f"prompt number {i}: compute {i} * {i}" for i in range(1000)]
    bodies = [{"text": prompt, "sampling_params": {"max_new_tokens": 32}} for prompt in prompts]
    many = asyncio.run(post_many(f"{router.url}/generate", bodies))
    assert [answer.status for answer in many] == [200] * 1000
    assert [answer.body["text"] for answer in many] == [prompt[:32] for prompt in prompts]
    spread = Counter(answer.headers["x-slime-worker"] for answer in many)
    assert set(spread) == {u.url for u in upstreams}

    group_prompt = {
        "text": "one GRPO group, one prompt: 12 * 12 = ?",
        "sampling_params": {"max_new_tokens": 8},
    }
    group = asyncio.run(post_many(f"{router.url}/generate", [group_prompt] * 8))
    assert len({answer.headers["x-slime-worker"] for answer in group}) == 1


def test_abort_fans_out_to_every_worker(start_router, echo_upstreams) -> None:
    upstreams = echo_upstreams(2, token_latency=0.5)
    router = start_router("--policy", "round_robin", "--worker-urls", *(u.url for u in upstreams))
    for upstream in upstreams:
        router.wait_state(upstream.url, "HEALTHY")

    async def run() -> tuple[list[httpx.Response], dict, float]:
        async with httpx.AsyncClient(timeout=30) as client:
            body = {"text": "a long answer " * 4, "sampling_params": {"max_new_tokens": 40}}
            pending = [
                asyncio.create_task(client.post(f"{router.url}/generate", json=body)) for _ in range(4)
            ]
            while not all(u.stats()["in_flight"] for u in upstreams):
                await asyncio.sleep(0.05)
            started = time.monotonic()
            aborted = (await client.post(f"{router.url}/abort_request", json={"abort_all": True})).json()
            answers = await asyncio.gather(*pending)
            return answers, aborted, time.monotonic() - started

    answers, aborted, elapsed = asyncio.run(run())
    assert aborted == {"workers": {u.url: {"status": 200} for u in upstreams}}
    assert [a.json()["meta_info"]["finish_reason"]["type"] for a in answers] == ["abort"] * 4
    assert elapsed < 5  # 40 tokens at 0.5 s would take 20 s
    assert sum(u.stats()["aborted"] for u in upstreams) == 4


def test_retries_are_bounded_and_say_why(start_router, echo_upstreams) -> None:
    slow, also_slow = echo_upstreams(2, latency=5)
    router = start_router(
        "--policy",
        "round_robin",
        "--request-timeout",
        "0.3",
        "--max-retries",
        "1",
        "--worker-urls",
        slow.url,
        also_slow.url,
    )
    router.wait_state(slow.url, "HEALTHY")
    router.wait_state(also_slow.url, "HEALTHY")
    started = time.monotonic()
    answer = generate(router.url, "too slow")
    assert answer.status_code == 503 and time.monotonic() - started < 3
    message = answer.json()["error"]["message"]
    assert "all 2 attempts failed" in message and "--request-timeout 0.3s" in message
    assert slow.url in message and also_slow.url in message


def test_middlewares_are_built_with_the_router_and_wrap_every_request(start_router, echo_upstreams) -> None:
    (upstream,) = echo_upstreams(1)
    router = start_router(
        "--use-slime-router",
        "--policy",
        "least_load",
        "--slime-router-middleware-paths",
        "tests.router.middleware_plugins.StampMiddleware",
        "tests.router.middleware_plugins.OrderMiddleware",
        "--worker-urls",
        upstream.url,
    )
    router.wait_state(upstream.url, "HEALTHY")
    answer = generate(router.url, "stamp me", max_new_tokens=5)
    assert answer.json()["text"] == "stamp"
    assert answer.headers["x-stamp"] == "least_load"
    # slime's order: the middleware listed last is the outermost one.
    assert answer.headers["x-order"] == "outer"
    stream = httpx.post(
        f"{router.url}/generate",
        json={"text": "abc", "stream": True, "sampling_params": {"max_new_tokens": 3}},
    )
    assert stream.headers["x-stamp"] == "least_load" and stream.text.endswith("data: [DONE]\n\n")
    assert httpx.get(f"{router.url}/list_workers").headers["x-stamp"] == "least_load"
    assert router.router.stamped == 4


def test_a_loading_engine_is_not_declared_dead_within_first_wait(start_router, echo_upstreams) -> None:
    (loading,) = echo_upstreams(1)
    loading.control(health="fail")  # /health_generate answers 503, as an engine still loading its weights
    router = start_router()
    added = httpx.post(f"{router.url}/add_worker", params={"url": loading.url}).json()
    assert added["state"] == "STARTING"
    assert generate(router.url, "too early").status_code == 503
    # Several failed probes (every 0.5 s), all inside --rollout-health-check-first-wait (3 s): not DEAD.
    time.sleep(1.5)
    assert router.workers()[loading.url]["state"] == "STARTING"
    loading.control(health="ok")
    router.wait_state(loading.url, "HEALTHY", timeout=5)
    assert generate(router.url, "now", max_new_tokens=3).json()["text"] == "now"
