"""Router test fixtures: EchoUpstream engines as real subprocesses (killable with SIGKILL) and routers served by
uvicorn on loopback, all sharing a real redis-server."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
import uvicorn

from router.server import Router, build_parser
from services.core.embedded_redis import EmbeddedRedis
from services.core.net import free_port

REPO = Path(__file__).resolve().parents[2]
# Fast health checks so that a dead engine is found in about a second.
HEALTH_FLAGS = [
    "--rollout-health-check-interval",
    "0.5",
    "--rollout-health-check-timeout",
    "0.5",
    "--rollout-health-check-first-wait",
    "3",
]


class EchoProcess:
    """One ``python -m router.echo_upstream`` process on a fixed port, so that it can be killed and restarted."""

    def __init__(self, port: int | None = None, **options: Any) -> None:
        self.port = port or free_port()
        self.options = options
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def spawn(self, **options: Any) -> EchoProcess:
        """Start the process (``options`` override the constructor's); call ``wait_ready`` before use."""
        self.options = {**self.options, **options}
        argv = [sys.executable, "-m", "router.echo_upstream", "--port", str(self.port)]
        for name, value in self.options.items():
            argv += [f"--{name.replace('_', '-')}", str(value)]
        # A file, not a pipe: nobody reads the log while the process runs, and a full pipe would block it.
        # It lives as long as the process and is closed with it (kill9, stop).
        self.log = tempfile.TemporaryFile()  # noqa: SIM115
        self.process = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=self.log)
        return self

    def wait_ready(self, timeout: float = 30.0) -> EchoProcess:
        deadline = time.monotonic() + timeout
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"echo upstream on {self.port} exited: {self.log.read().decode()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"echo upstream on {self.port} did not start")
            time.sleep(0.05)

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

    def control(self, **settings: Any) -> dict:
        return httpx.post(f"{self.url}/control", json=settings, timeout=5).json()

    def stats(self) -> dict:
        return httpx.get(f"{self.url}/stats", timeout=5).json()


@pytest.fixture
def echo_upstreams() -> Iterator[Callable[..., list[EchoProcess]]]:
    """Factory: ``echo_upstreams(n, **options)`` starts n EchoUpstream processes (in parallel) and returns them."""
    started: list[EchoProcess] = []

    def start(count: int, **options: Any) -> list[EchoProcess]:
        batch = [EchoProcess(**options).spawn() for _ in range(count)]
        started.extend(batch)
        for upstream in batch:
            upstream.wait_ready()
        return batch

    yield start
    for upstream in started:
        upstream.stop()


class RouterServer:
    """A ``Router`` served by uvicorn in a background thread (its own event loop), on a free port."""

    def __init__(self, argv: list[str]) -> None:
        self.port = free_port()
        self.args = build_parser().parse_args([*argv, "--port", str(self.port)])
        self.router = Router(self.args)
        config = uvicorn.Config(self.router.asgi, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> RouterServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("router did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)

    def workers_view(self) -> dict:
        return httpx.get(f"{self.url}/workers", timeout=5).json()

    def workers(self) -> dict[str, dict]:
        return {worker["url"]: worker for worker in self.workers_view()["workers"]}

    def wait_state(self, url: str, state: str, timeout: float = 10.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            worker = self.workers().get(url)
            if worker is not None and worker["state"] == state:
                return worker
            if time.monotonic() > deadline:
                raise AssertionError(f"{url} did not reach {state} within {timeout}s: {worker}")
            time.sleep(0.05)


@pytest.fixture
def start_router(redis_server: EmbeddedRedis) -> Iterator[Callable[..., RouterServer]]:
    """Factory: ``start_router(*flags, redis=True)`` serves a router on the test's Redis with fast health checks."""
    started: list[RouterServer] = []

    def start(*flags: str, redis: bool = True) -> RouterServer:
        argv = [*HEALTH_FLAGS, "--run-id", "test", *flags]
        if redis:
            argv += ["--redis-url", redis_server.url]
        server = RouterServer(argv).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


class SteadyLoad:
    """Clients sending /generate back to back from a background thread; every answer is checked."""

    def __init__(
        self,
        url: str,
        concurrency: int = 8,
        max_new_tokens: int = 6,
        check: Callable[[str, dict], str | None] | None = None,
    ) -> None:
        """``check(prompt, answer)`` says what is wrong with an answer (None: nothing); by default the answer
        must be EchoUpstream's echo of the prompt."""
        self.url = url
        self.concurrency = concurrency
        self.max_new_tokens = max_new_tokens
        self.check = check or self._echoed
        self.failures: list[str] = []
        self.answered = 0
        self.served_by: Counter[str] = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def __enter__(self) -> SteadyLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def wait_answers(self, count: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        target = self.answered + count
        while self.answered < target:
            assert time.monotonic() < deadline, f"load stalled at {self.answered} answers"
            time.sleep(0.02)

    def _echoed(self, prompt: str, answer: dict) -> str | None:
        return None if answer["text"] == prompt[: self.max_new_tokens] else "not the echo of the prompt"

    async def _run(self) -> None:
        # aiohttp, not httpx: under hundreds of concurrent requests httpx's pool costs several times more CPU.
        connector = aiohttp.TCPConnector(limit=self.concurrency)
        async with aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=30)
        ) as session:
            await asyncio.gather(*(self._client(session, index) for index in range(self.concurrency)))

    async def _client(self, session: aiohttp.ClientSession, index: int) -> None:
        sent = 0
        while not self._stop.is_set():
            prompt = f"client {index} request {sent}"
            sent += 1
            body = {"text": prompt, "sampling_params": {"max_new_tokens": self.max_new_tokens}}
            try:
                async with session.post(f"{self.url}/generate", json=body) as response:
                    text = await response.text()
                    worker = response.headers.get("x-slime-worker")
                    status = response.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                self.failures.append(f"{prompt}: {type(exc).__name__}: {exc}")
                continue
            problem = f"HTTP {status}" if status != 200 else self.check(prompt, json.loads(text))
            if problem is not None:
                self.failures.append(f"{prompt}: {problem}: {text[:300]}")
                continue
            self.answered += 1
            self.served_by[worker] += 1


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: Any


async def post_many(url: str, bodies: list[dict]) -> list[Answer]:
    """POST every body at once (aiohttp, one connection each) and return the answers in order."""
    connector = aiohttp.TCPConnector(limit=len(bodies))
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:

        async def one(body: dict) -> Answer:
            async with session.post(url, json=body) as response:
                return Answer(response.status, dict(response.headers), await response.json(content_type=None))

        return await asyncio.gather(*(one(body) for body in bodies))
