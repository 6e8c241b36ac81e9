"""HTTP ingestion into the rollout buffer: trajectories/s and latency with 1, 8 and 64 concurrent clients.

Durable: ``rollout_buffer.server`` storing into Redis with AOF (appendfsync everysec). Baseline: an in-memory
FastAPI buffer with the same API shape, built the way slime's ``slime_plugins/rollout_buffer/buffer.py`` is (items
appended to a dict of lists under a lock, a deep copy kept for the read's meta info, a pydantic BufferResponse).
Both run as their own process on loopback and receive the same items from the same load generator, a minimal
keep-alive HTTP/1.1 client, so that the client's own cost stays small next to the servers'.

    .venv/bin/python bench/bench_buffer.py [--duration 5] [--concurrency 1 8 64] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import logging
import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import uvicorn
from fastapi import FastAPI, HTTPException, Request
from pydantic import BaseModel

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from services.core.embedded_redis import EmbeddedRedis  # noqa: E402
from services.core.logging_setup import setup_logging  # noqa: E402
from services.core.net import free_port, wait_http_ok  # noqa: E402

logger = logging.getLogger("bench_buffer")
GROUP_SIZE = 8


class BufferResponse(BaseModel):
    success: bool
    message: str = ""
    data: dict[str, Any] | None = None


class InMemoryBuffer:
    def __init__(self, group_size: int):
        self.group_size = group_size
        self.data: dict[Any, list[dict]] = {}
        self.temp_data: dict[Any, list[dict]] = {}
        self.lock = threading.RLock()

    def write(self, item: dict) -> dict:
        with self.lock:
            instance_id = item["instance_id"]
            self.temp_data.setdefault(instance_id, []).append(copy.deepcopy(item))
            self.data.setdefault(instance_id, []).append(item)
        return item

    def read(self) -> list[dict]:
        with self.lock:
            ready = [k for k, items in self.data.items() if len(items) >= self.group_size]
            out = [item for k in ready for item in self.data.pop(k)]
            self.temp_data = {}
        return out


def serve_in_memory_baseline(port: int) -> None:
    """slime's buffer design, in memory: the baseline the durable buffer is measured against."""
    app = FastAPI()
    buffer = InMemoryBuffer(GROUP_SIZE)

    @app.post("/buffer/write", response_model=BufferResponse)
    async def write(request: Request) -> BufferResponse:
        try:
            item = buffer.write(await request.json())
        except Exception as exc:
            raise HTTPException(status_code=500, detail=f"Write failed: {exc}") from exc
        return BufferResponse(
            success=True,
            message="Data has been successfully written to buffer",
            data={"data": [item], "meta_info": "write to buffer"},
        )

    @app.post("/get_rollout_data", response_model=BufferResponse)
    async def read() -> BufferResponse:
        items = buffer.read()
        return BufferResponse(success=bool(items), data={"data": items, "meta_info": {}})

    uvicorn.run(
        app, host="127.0.0.1", port=port, log_level="warning", access_log=False, limit_concurrency=1000
    )


def make_item(stream: str, n: int) -> bytes:
    """Item n of one client's stream: a trajectory of typical agent size (~1.1 kB) with a unique uid."""
    return orjson.dumps(
        {
            "uid": f"{stream}-{n}",
            "instance_id": f"{stream}-p{n // GROUP_SIZE}",
            "messages": [
                {"role": "system", "content": "You are a careful math assistant. " * 4},
                {"role": "user", "content": f"Compute {n} * 17 + 3 and explain each step. " * 3},
                {
                    "role": "assistant",
                    "content": "<think>" + "Multiply first, then add. " * 20 + "</think> 42",
                },
            ],
            "reward": float(n % 2),
            "extra_info": {
                "timestamp": str(time.time()),
                "finish_reason": "stop",
                "round_number": 1,
                "rollout_index": 1,
            },
        }
    )


class RawHttpClient:
    """One keep-alive HTTP/1.1 connection that posts JSON and reads a Content-Length response."""

    def __init__(self, port: int):
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)

    async def post(self, path: bytes, body: bytes) -> int:
        assert self.reader is not None and self.writer is not None
        self.writer.write(
            b"POST %s HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (path, len(body), body)
        )
        status = int((await self.reader.readline()).split()[1])
        length = 0
        while (line := await self.reader.readline()) != b"\r\n":
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
        await self.reader.readexactly(length)
        return status

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            await self.writer.wait_closed()


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            for child in (task / "children").read_text().split():
                found += [int(child), *_children(int(child))]
    return found


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of these processes and all their descendants (Linux /proc)."""
    total = 0.0
    for pid in {p for root in pids for p in (root, *_children(root))}:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


@dataclass
class LoadResult:
    target: str
    concurrency: int
    requests: int
    errors: int
    seconds: float
    p50_ms: float
    p99_ms: float
    # CPU the server side (the API processes, and Redis for the durable buffer) spent per trajectory.
    cpu_us: float = 0.0
    # Every 200 of the run, warm-up included: each must be in the durable store afterwards.
    answered_ok: int = 0

    @property
    def per_second(self) -> float:
        return self.requests / self.seconds


async def run_load(
    target: str, port: int, concurrency: int, duration: float, warmup: float, tag: str, pids: list[int]
) -> LoadResult:
    latencies: list[float] = []
    errors = 0
    answered_ok = 0
    measuring = False
    stop = False

    async def client(worker: int) -> None:
        nonlocal errors, answered_ok
        connection = RawHttpClient(port)
        await connection.connect()
        n = 0
        try:
            while not stop:
                body = make_item(f"{tag}-c{concurrency}-w{worker}", n)
                started = time.perf_counter()
                status = await connection.post(b"/buffer/write", body)
                elapsed = time.perf_counter() - started
                n += 1
                answered_ok += status == 200
                if measuring:
                    if status == 200:
                        latencies.append(elapsed)
                    else:
                        errors += 1
        finally:
            await connection.close()

    tasks = [asyncio.create_task(client(i)) for i in range(concurrency)]
    await asyncio.sleep(warmup)
    measuring = True
    started, cpu_before = time.perf_counter(), cpu_seconds(pids)
    await asyncio.sleep(duration)
    measuring = False
    seconds, cpu_used = time.perf_counter() - started, cpu_seconds(pids) - cpu_before
    stop = True
    await asyncio.gather(*tasks)
    latencies.sort()
    return LoadResult(
        target=target,
        concurrency=concurrency,
        requests=len(latencies),
        errors=errors,
        seconds=seconds,
        p50_ms=1000 * statistics.median(latencies),
        p99_ms=1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        cpu_us=1e6 * cpu_used / max(1, len(latencies) + errors),
        answered_ok=answered_ok,
    )


def _start(argv: list[str], health_url: str) -> subprocess.Popen:
    process = subprocess.Popen(argv, cwd=REPO)
    try:
        wait_http_ok(health_url, 60)
    except TimeoutError:
        process.kill()
        raise
    return process


def _durable_argv(redis_url: str, port: int, http_workers: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "rollout_buffer.server",
        "--redis-url",
        redis_url,
        "--port",
        str(port),
        "--grpc-port",
        str(free_port()),
        "--http-workers",
        str(http_workers),
        "--n-samples-per-prompt",
        str(GROUP_SIZE),
        "--buffer-max-items",
        "100000000",
        "--buffer-max-bytes",
        str(64 << 30),
        "--log-level",
        "WARNING",
    ]


def _stored_items(redis_url: str) -> int:
    import redis

    with redis.Redis.from_url(redis_url) as client:
        return int(client.hget("slime:default:buf:usage", "items") or 0)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=5.0, help="Measured seconds per run.")
    parser.add_argument("--warmup", type=float, default=1.0, help="Unmeasured seconds before each run.")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument(
        "--rounds", type=int, default=2, help="Runs per (target, concurrency); the best is kept."
    )
    parser.add_argument(
        "--http-workers", type=int, nargs="+", default=[1, 2], help="Durable variants: API processes of each."
    )
    parser.add_argument("--serve-baseline", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_baseline is not None:
        serve_in_memory_baseline(args.serve_baseline)
        return 0
    setup_logging("INFO", service="bench")

    baseline_name = "in-memory (slime design)"
    results: dict[tuple[str, int], LoadResult] = {}
    acknowledged = 0
    with EmbeddedRedis(appendonly=True) as redis_server:
        targets: list[tuple[str, int, subprocess.Popen, list[int]]] = []
        try:
            port = free_port()
            process = _start(
                [sys.executable, __file__, "--serve-baseline", str(port)], f"http://127.0.0.1:{port}/docs"
            )
            targets.append((baseline_name, port, process, [process.pid]))
            for workers in args.http_workers:
                port = free_port()
                process = _start(
                    _durable_argv(redis_server.url, port, workers), f"http://127.0.0.1:{port}/health"
                )
                name = f"durable, {workers} API process{'es' if workers > 1 else ''}"
                targets.append((name, port, process, [process.pid, redis_server.pid]))
            for round_ in range(args.rounds):
                for concurrency in args.concurrency:
                    for name, port, _, pids in targets:
                        tag = f"{round_}-{name}"
                        result = asyncio.run(
                            run_load(name, port, concurrency, args.duration, args.warmup, tag, pids)
                        )
                        if name != baseline_name:
                            acknowledged += result.answered_ok
                        logger.info(
                            "%-28s c=%-3d %7.0f traj/s  p50 %7.2f ms  p99 %7.2f ms  cpu %5.0f us/traj  errors %d",
                            name,
                            concurrency,
                            result.per_second,
                            result.p50_ms,
                            result.p99_ms,
                            result.cpu_us,
                            result.errors,
                        )
                        best = results.get((name, concurrency))
                        if best is None or result.per_second > best.per_second:
                            results[(name, concurrency)] = result
        finally:
            for _, _, process, _ in targets:
                process.terminate()
            for _, _, process, _ in targets:
                process.wait(30)
        stored = _stored_items(redis_server.url)
        aof = sum(f.stat().st_size for f in Path(redis_server.dir).rglob("*.aof*"))

    durable_names = [name for name, *_ in targets if name != baseline_name]
    print(
        "\n| clients | "
        + " | ".join(f"{n}: traj/s, p99 ms, CPU us/traj" for n in [baseline_name, *durable_names])
        + " |"
    )
    print("|---" * (1 + 1 + len(durable_names)) + "|")
    for concurrency in args.concurrency:
        base = results[(baseline_name, concurrency)]
        cells = [f"{base.per_second:,.0f}, {base.p99_ms:.1f}, {base.cpu_us:.0f}"]
        for name in durable_names:
            ours = results[(name, concurrency)]
            ratio = ours.per_second / base.per_second
            cells.append(f"{ours.per_second:,.0f} ({ratio:.2f}x), {ours.p99_ms:.1f}, {ours.cpu_us:.0f}")
        print(f"| {concurrency} | " + " | ".join(cells) + " |")
    print(f"\nDurable writes answered 200: {acknowledged:,}; items in Redis after the run: {stored:,}")
    print(f"AOF written: {aof / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
