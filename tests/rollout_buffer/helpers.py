"""Helpers of the rollout-buffer tests: items as agents send them, and the buffer app served on loopback."""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import orjson
import uvicorn

from rollout_buffer.server import BufferConfig, build_app
from rollout_buffer.store import NewItem
from services.core.net import free_port
from services.core.supervisor import ServiceProcess


def trajectory(uid: str, instance_id: Any, reward: float = 1.0, answer: str = "4", **extra_info: Any) -> dict:
    """A trajectory item as slime's agents send it."""
    return {
        "uid": uid,
        "instance_id": instance_id,
        "messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": answer}],
        "reward": reward,
        "extra_info": extra_info,
    }


def new_item(uid: str, instance_id: str, **kwargs: Any) -> NewItem:
    return NewItem(
        uid=uid, instance_id=instance_id, payload=orjson.dumps(trajectory(uid, instance_id)), **kwargs
    )


@dataclass
class ServedBuffer:
    url: str
    grpc_addr: str
    config: BufferConfig
    # One client for the whole test: building an httpx client (its TLS context) costs ~0.15 s each time.
    http: httpx.Client


@contextlib.contextmanager
def serve(config: BufferConfig) -> Iterator[ServedBuffer]:
    """Run the buffer app (HTTP + gRPC) on loopback in a thread, as ``slime serve rollout-buffer`` would."""
    port = free_port()
    config = replace(config, grpc_port=config.grpc_port or free_port())
    config.settings.grpc_port = config.grpc_port
    server = uvicorn.Server(
        uvicorn.Config(build_app(config), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the buffer app did not start")
        time.sleep(0.02)
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, trust_env=False, timeout=30) as http:
            yield ServedBuffer(url, f"127.0.0.1:{config.grpc_port}", config, http)
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def buffer_process(redis_url: str, port: int, log: Path, group_size: int = 1) -> ServiceProcess:
    """``slime serve rollout-buffer`` as a process of its own on ``port`` (and a free gRPC port), started healthy."""
    argv = [
        sys.executable,
        "-m",
        "rollout_buffer.server",
        "--port",
        str(port),
        "--grpc-port",
        str(free_port()),
        "--redis-url",
        redis_url,
        "--n-samples-per-prompt",
        str(group_size),
        "--log-level",
        "WARNING",
    ]
    process = ServiceProcess(
        "rollout-buffer", argv, health_url=f"http://127.0.0.1:{port}/health", log_path=log
    )
    process.start().wait_healthy(60)
    return process
