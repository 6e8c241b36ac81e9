"""Fixtures of the reward-model tests: real reward-model servers as `slime serve reward-model` subprocesses, and
small real HTTP servers (uvicorn, a forwarding proxy) on loopback inside the test's event loop."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn

from services.core.net import free_port, wait_http_ok

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "reward-test-token"


def is_gone(pid: int) -> bool:
    """True when ``pid`` has exited (a zombie nobody reaped yet counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


def wait_gone(pids: list[int], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(is_gone(pid) for pid in pids):
            return True
        time.sleep(0.05)
    return False


@dataclass
class RewardServer:
    """A running `slime serve reward-model` process."""

    process: subprocess.Popen
    port: int
    grpc_port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def grpc_addr(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def launch_reward_server(log_dir: Path, name: str, *flags: str) -> RewardServer:
    """Start the service with ``flags`` on free ports; call ``wait_ready`` before using it."""
    port, grpc_port = free_port(), free_port()
    log = log_dir / f"{name}.log"
    slime = Path(sys.executable).with_name("slime")
    command = [
        str(slime),
        "serve",
        "reward-model",
        "--port",
        str(port),
        "--grpc-port",
        str(grpc_port),
        *flags,
    ]
    # A console script does not put the working directory on sys.path; the custom reward modules live in tests/.
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    with log.open("w") as sink:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT)
    return RewardServer(process, port, grpc_port, log)


def wait_ready(server: RewardServer, timeout: float = 90.0) -> RewardServer:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise AssertionError(
                f"reward server exited with {server.process.returncode}:\n{server.log_text()}"
            )
        try:
            wait_http_ok(f"{server.url}/health", timeout=0.5)
            return server
        except TimeoutError:
            continue
    raise AssertionError(f"reward server did not start within {timeout:g}s:\n{server.log_text()}")


def stop_reward_server(server: RewardServer) -> int:
    """SIGTERM (graceful shutdown), SIGKILL if that takes too long; the exit code."""
    if server.process.poll() is None:
        server.process.terminate()
        try:
            server.process.wait(20)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait(10)
    return server.process.returncode


@contextlib.contextmanager
def reward_servers(log_dir: Path, *specs: tuple[str, tuple[str, ...]]) -> Iterator[list[RewardServer]]:
    """Start several servers at once (their start-ups overlap), yield them ready, stop them all after."""
    servers = [launch_reward_server(log_dir, name, *flags) for name, flags in specs]
    try:
        yield [wait_ready(server) for server in servers]
    finally:
        for server in servers:
            stop_reward_server(server)


@contextlib.asynccontextmanager
async def serve_app(app: object) -> AsyncIterator[str]:
    """Serve an ASGI app with uvicorn on a free loopback port in this event loop; yield its base URL."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    task = asyncio.ensure_future(server.serve())
    for _ in range(500):
        if server.started or task.done():
            break
        await asyncio.sleep(0.01)
    if not server.started:
        task.cancel()
        raise AssertionError(f"uvicorn did not start on port {port}")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


@dataclass
class ForwardProxy:
    """A plain HTTP forward proxy: takes absolute-URI requests, relays them, remembers what it relayed."""

    seen: list[str] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            request_line, *header_lines = head.decode("latin-1").split("\r\n")
            method, target, version = request_line.split(" ")
            self.seen.append(f"{method} {target}")
            headers = [line for line in header_lines if line and not line.lower().startswith("connection:")]
            length = next(
                (int(h.split(":", 1)[1]) for h in headers if h.lower().startswith("content-length:")), 0
            )
            body = await reader.readexactly(length)
            hostport, _, path = target.removeprefix("http://").partition("/")
            host, _, port = hostport.partition(":")
            upstream_reader, upstream_writer = await asyncio.open_connection(host, int(port or 80))
            upstream_head = "\r\n".join(
                [f"{method} /{path} {version}", *headers, "Connection: close", "", ""]
            )
            upstream_writer.write(upstream_head.encode("latin-1") + body)
            await upstream_writer.drain()
            writer.write(await upstream_reader.read())
            await writer.drain()
            upstream_writer.close()
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def forward_proxy() -> AsyncIterator[tuple[str, ForwardProxy]]:
    proxy = ForwardProxy()
    server = await asyncio.start_server(proxy.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", proxy
    finally:
        server.close()
        await server.wait_closed()
