"""The router with real rollout engines (``services.rollout_engine.server``, the built-in torch engine serving a
tiny model) as separate processes: kill -9 under load, restart with stale weights, a thousand concurrent requests,
and the same engines behind the real ``sglang-router`` (the PyPI package's Rust binary)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from services.core.embedded_redis import EmbeddedRedis
from services.core.net import free_port
from services.core.tiny_model import build_tiny_model, default_corpus
from tests.router.conftest import HEALTH_FLAGS, REPO, RouterServer, SteadyLoad, post_many

pytestmark = pytest.mark.slow

WEIGHTS = "1"  # the weight version the "trainer" publishes in these tests
GREEDY = {"temperature": 0.0, "max_new_tokens": 4}


class EngineProcess:
    """``python -m services.rollout_engine.server`` on a fixed port: killable with SIGKILL and restartable."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def spawn(self) -> EngineProcess:
        argv = [
            sys.executable,
            "-m",
            "services.rollout_engine.server",
            "--hf-checkpoint",
            str(self.model_dir),
            "--port",
            str(self.port),
            "--engine-backend",
            "builtin",
            "--engine-device",
            "cpu",
            "--num-threads",
            "1",
            "--log-level",
            "WARNING",
        ]
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - closed with the process (stop)
        self.process = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=self.log)
        return self

    def wait_ready(self, timeout: float = 180.0) -> EngineProcess:
        deadline = time.monotonic() + timeout
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"engine on {self.port} exited: {self.log.read().decode()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/health_generate", timeout=5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"engine on {self.port} did not become healthy in {timeout}s")
            time.sleep(0.2)

    def set_weight_version(self, version: str) -> None:
        answer = httpx.post(f"{self.url}/update_weight_version", json={"new_version": version}, timeout=10)
        assert answer.json()["weight_version"] == version

    def kill9(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait()
        self.log.close()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
            self.log.close()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(
        tmp_path_factory.mktemp("router-engines") / "tiny",
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=64,
        corpus=default_corpus(lines=200),
    )


@pytest.fixture(scope="module")
def engines(tiny_model: Path) -> Iterator[list[EngineProcess]]:
    """Three engines for the module, started together, holding the published weights."""
    started = [EngineProcess(tiny_model).spawn() for _ in range(3)]
    try:
        for engine in started:
            engine.wait_ready()
            engine.set_weight_version(WEIGHTS)
        yield started
    finally:
        for engine in started:
            engine.stop()


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis(dir=tmp_path_factory.mktemp("router-engines-redis")) as server:
        yield server


@pytest.fixture
def router_for(redis: EmbeddedRedis) -> Iterator:
    """Factory: a router (own run id, so tests do not share workers) in front of the given engines."""
    started: list[RouterServer] = []

    def start(engines: list[EngineProcess], *flags: str) -> RouterServer:
        run_id = f"engines-{len(started)}-{time.monotonic_ns()}"
        argv = [*HEALTH_FLAGS, "--redis-url", redis.url, "--run-id", run_id, *flags]
        router = RouterServer([*argv, "--worker-urls", *(e.url for e in engines)]).start()
        started.append(router)
        for engine in engines:
            router.wait_state(engine.url, "HEALTHY", timeout=30)
        assert (
            httpx.post(f"{router.url}/set_weight_version", json={"weight_version": WEIGHTS}).status_code
            == 200
        )
        return router

    yield start
    for router in started:
        router.stop()


def generated(prompt: str, answer: dict) -> str | None:
    """An engine's answer is right when it finished normally with the tokens asked for."""
    meta = answer["meta_info"]
    if meta["finish_reason"]["type"] not in ("length", "stop") or not 0 < meta["completion_tokens"] <= 4:
        return f"unexpected finish {meta['finish_reason']} after {meta['completion_tokens']} tokens"
    if meta["weight_version"] != WEIGHTS:
        return f"served by weights {meta['weight_version']}, published {WEIGHTS}"
    return None


def test_kill9_engine_under_load_then_restart_stays_stale_until_it_has_the_weights(
    engines, router_for
) -> None:
    router = router_for(engines, "--policy", "least_load")
    victim = engines[2]
    with SteadyLoad(router.url, concurrency=8, max_new_tokens=4, check=generated) as load:
        load.wait_answers(30, timeout=60)
        killed_at = time.time()
        victim.kill9()
        dead = router.wait_state(victim.url, "DEAD", timeout=10)
        assert dead["state_since"] - killed_at <= 1.0  # --rollout-health-check-interval + -timeout
        load.wait_answers(30, timeout=60)

        # Restarted, it loads the checkpoint's weights (version "default"): up, healthy, but STALE.
        victim.spawn().wait_ready()
        stale = router.wait_state(victim.url, "STALE", timeout=15)
        assert stale["weight_version"] == "default"
        served_before = load.served_by[victim.url]
        load.wait_answers(30, timeout=60)
        assert load.served_by[victim.url] == served_before, "a STALE engine got traffic"

        # The trainer's weight push brings it to the published version; it takes traffic again.
        victim.set_weight_version(WEIGHTS)
        router.wait_state(victim.url, "HEALTHY", timeout=15)
        load.wait_answers(30, timeout=60)
        deadline = time.monotonic() + 30
        while load.served_by[victim.url] == served_before:
            assert time.monotonic() < deadline, "the caught-up engine got no traffic"
            time.sleep(0.1)
    assert load.failures == []


def test_a_thousand_concurrent_requests_over_three_engines(engines, router_for) -> None:
    router = router_for(engines, "--policy", "cache_aware", "--rollout-health-check-timeout", "30")
    prompts = [f"What is {i} + {i}?" for i in range(1000)]
    bodies = [{"text": prompt, "sampling_params": {"max_new_tokens": 2}} for prompt in prompts]
    answers = asyncio.run(post_many(f"{router.url}/generate", bodies))
    assert [answer.status for answer in answers] == [200] * 1000
    assert all(answer.body["meta_info"]["completion_tokens"] in (1, 2) for answer in answers)
    assert set(Counter(answer.headers["x-slime-worker"] for answer in answers)) == {e.url for e in engines}

    # One GRPO group: n samples of one prompt land on one engine (its prefix cache).
    group = {
        "text": "Question: what is 17 * 3? Think step by step.",
        "sampling_params": {"max_new_tokens": 4},
    }
    samples = asyncio.run(post_many(f"{router.url}/generate", [group] * 8))
    assert [answer.status for answer in samples] == [200] * 8
    assert len({answer.headers["x-slime-worker"] for answer in samples}) == 1


def test_our_engines_behind_the_real_sglang_router(engines) -> None:
    pytest.importorskip("sglang_router")
    port = free_port()
    router = subprocess.Popen(
        [sys.executable, "-m", "sglang_router.launch_router", "--host", "127.0.0.1", "--port", str(port)]
        + ["--policy", "round_robin", "--log-level", "warn"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/workers", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "sglang-router did not start"
            time.sleep(0.2)
        for engine in engines:
            # sglang-router 0.3's registration API (it fetches /get_server_info and /get_model_info).
            assert httpx.post(f"{url}/workers", json={"url": engine.url}).status_code == 202
        while len([w for w in httpx.get(f"{url}/workers").json()["workers"] if w["is_healthy"]]) < 3:
            assert time.monotonic() < deadline, httpx.get(f"{url}/workers").text
            time.sleep(0.2)

        prompts = ["What is 1 + 2?", "The quick brown fox", "Answer: the sum is", "Let me check"]
        for prompt in prompts:
            body = {"text": prompt, "sampling_params": GREEDY, "return_logprob": True}
            direct = httpx.post(f"{engines[0].url}/generate", json=body, timeout=30).json()
            routed = httpx.post(f"{url}/generate", json=body, timeout=30)
            assert routed.status_code == 200, routed.text
            answer = routed.json()
            # Greedy decoding of the same weights: the router's answer is the engine's answer.
            assert answer["text"] == direct["text"]
            assert [t[1] for t in answer["meta_info"]["output_token_logprobs"]] == [
                t[1] for t in direct["meta_info"]["output_token_logprobs"]
            ]
            assert answer["meta_info"]["finish_reason"]["type"] in ("length", "stop")
    finally:
        router.terminate()
        try:
            router.wait(timeout=10)
        except subprocess.TimeoutExpired:
            router.kill()
            router.wait()
