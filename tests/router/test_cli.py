"""``slime serve router`` as a real process: it serves, stops on SIGTERM, and rejects bad flags with exit 2."""

from __future__ import annotations

import asyncio
import logging
import signal
import subprocess
import sys
import uuid

import httpx
import pytest

from router.server import main
from services.core.net import free_port, wait_http_ok
from tests.router.conftest import REPO, EchoProcess, post_many


def serve(*flags: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "services.cli", "serve", "router", *flags],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_serves_the_workers_it_was_given_and_stops_on_sigterm(echo_upstreams, redis_server) -> None:
    (upstream,) = echo_upstreams(1)
    port = free_port()
    process = serve("--port", str(port), "--redis-url", redis_server.url, "--worker-urls", upstream.url)
    try:
        wait_http_ok(f"http://127.0.0.1:{port}/health", timeout=60)
        answer = httpx.post(
            f"http://127.0.0.1:{port}/generate",
            json={"text": "served", "sampling_params": {"max_new_tokens": 6}},
        )
        assert answer.json()["text"] == "served"
        assert httpx.get(f"http://127.0.0.1:{port}/health").json() == {"status": "ok", "service": "router"}
    finally:
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=30)
    # uvicorn shuts down gracefully, then re-raises the signal it caught (exit by SIGTERM).
    assert process.returncode in (0, -signal.SIGTERM), err
    assert "Application shutdown complete" in err


@pytest.mark.parametrize(
    ("flags", "flag"),
    [
        (["--worker-urls", "localhost:30001"], "--worker-urls"),
        (
            ["--slime-router-middleware-paths", "no_such_package.Middleware"],
            "--slime-router-middleware-paths",
        ),
        (["--rollout-health-check-interval", "0"], "--rollout-health-check-interval"),
        (["--policy", "fastest"], "--policy"),
        (["--max-retries", "-1"], "--max-retries"),
        (["--workers", "2"], "--redis-url"),
        (["--workers", "0"], "--workers"),
    ],
)
def test_bad_flags_exit_2_naming_the_flag(flags: list[str], flag: str, capsys: pytest.CaptureFixture) -> None:
    # main() sets up logging on the captured stderr; the handlers go back afterwards, so that later tests do not
    # log into a closed stream.
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        with pytest.raises(SystemExit) as exit_info:
            main([*flags, "--port", str(free_port())])
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    assert exit_info.value.code == 2
    assert flag in capsys.readouterr().err


def test_several_processes_share_the_port_the_registry_and_the_group_affinity(
    echo_upstreams, redis_server
) -> None:
    upstreams = echo_upstreams(3)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = serve(
        "--port",
        str(port),
        "--workers",
        "3",
        "--redis-url",
        redis_server.url,
        "--worker-urls",
        *(u.url for u in upstreams),
    )
    try:
        wait_http_ok(f"{url}/health", timeout=60)
        assert httpx.get(f"{url}/list_workers").json() == {"urls": [u.url for u in upstreams]}
        # Each sample on its own connection, so the kernel spreads them over the processes: still one engine.
        body = {"text": "one group, one prompt", "sampling_params": {"max_new_tokens": 5}}
        group = asyncio.run(post_many(f"{url}/generate", [body] * 24))
        assert [answer.status for answer in group] == [200] * 24
        assert len({answer.headers["x-slime-worker"] for answer in group}) == 1
        # Prompts that share no prefix (cache_aware follows shared prefixes): their hashes spread them.
        others = [
            {"text": f"{uuid.uuid4().hex} tell me", "sampling_params": {"max_new_tokens": 5}}
            for _ in range(30)
        ]
        spread = {
            answer.headers["x-slime-worker"] for answer in asyncio.run(post_many(f"{url}/generate", others))
        }
        assert spread == {u.url for u in upstreams}
    finally:
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    assert err.count("Application shutdown complete") == 3
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/health")


def test_radix_middleware_without_a_tokenizer_is_a_flag_error() -> None:
    process = serve("--slime-router-middleware-paths", "RadixTreeMiddleware", "--port", str(free_port()))
    _, err = process.communicate(timeout=60)
    assert process.returncode == 2 and "--hf-checkpoint" in err


def test_echo_upstream_restarts_on_its_port() -> None:
    upstream = EchoProcess().spawn().wait_ready()
    try:
        upstream.kill9()
        upstream.spawn(weight_version=7).wait_ready()
        assert httpx.get(f"{upstream.url}/get_weight_version").json() == {"weight_version": "7"}
    finally:
        upstream.stop()
