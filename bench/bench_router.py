"""Router overhead: latency added (p50/p99) and maximum requests/s of ``slime serve router`` against calling the
engines directly and against ``sglang-router`` (the PyPI package's Rust router) in front of the same engines.

The engines are EchoUpstream processes (``router.echo_upstream``: answers ``/generate`` at once), so that what is
measured is the router itself. Every target gets the same requests from the same load generator, a minimal
keep-alive HTTP/1.1 client (httptools), in rounds that alternate the targets; medians over the rounds are reported.
Besides wall-clock numbers, which on a shared host mostly measure how much CPU each process wins, the CPU time the
router process spends per request is reported (all its threads, from /proc).

    .venv/bin/python bench/bench_router.py [--engines 3] [--latency-requests 2000] [--duration 5]
        [--concurrency 64] [--clients 2] [--rounds 3] [--router-processes 4]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import httptools

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from services.core.embedded_redis import EmbeddedRedis, RedisServerNotFoundError  # noqa: E402
from services.core.logging_setup import setup_logging  # noqa: E402
from services.core.net import free_port, wait_http_ok  # noqa: E402

logger = logging.getLogger("bench_router")
BODY = b'{"text":"What is 12 + 30? Think step by step.","sampling_params":{"max_new_tokens":8}}'
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection that carries one request at a time."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.done: asyncio.Future | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_exception(ConnectionError(f"connection lost: {exc}"))

    def on_message_complete(self) -> None:
        assert self.done is not None
        self.done.set_result(self.parser.get_status_code())

    async def post(self, request: bytes) -> int:
        assert self.transport is not None
        self.done = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return await self.done


def _request_bytes(host: str, port: int) -> bytes:
    head = (
        f"POST /generate HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(BODY)}\r\n\r\n"
    )
    return head.encode() + BODY


async def _drive(urls: list[str], concurrency: int, stop: Callable[[int], bool]) -> tuple[list[float], int]:
    """``concurrency`` connections spread over ``urls`` send requests back to back until ``stop(sent)``."""
    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    errors = 0
    sent = 0

    async def client(index: int) -> None:
        nonlocal errors, sent
        host, port = urls[index % len(urls)].removeprefix("http://").split(":")
        _, connection = await loop.create_connection(_Connection, host, int(port))
        request = _request_bytes(host, int(port))
        while not stop(sent):
            sent += 1
            started = time.perf_counter()
            status = await connection.post(request)
            latencies.append(time.perf_counter() - started)
            errors += status != 200
        assert connection.transport is not None
        connection.transport.close()

    await asyncio.gather(*(client(index) for index in range(concurrency)))
    return latencies, errors


def _load_process(urls: list[str], concurrency: int, duration: float, queue: multiprocessing.Queue) -> None:
    deadline = time.monotonic() + duration
    latencies, errors = asyncio.run(_drive(urls, concurrency, lambda _: time.monotonic() >= deadline))
    queue.put((len(latencies), errors))


def _stat(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _cpu_seconds(pid: int) -> float:
    """CPU time of ``pid`` (all its threads) and of its child processes (a router started with --workers)."""
    pids = [pid]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int(_stat(int(entry.name))[1]) == pid:
                    pids.append(int(entry.name))
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue
    total = 0.0
    for each in pids:
        try:
            fields = _stat(each)
        except FileNotFoundError:
            continue
        total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return total


@dataclass
class Target:
    name: str
    urls: list[str]
    pid: int | None = None
    p50_ms: list[float] = field(default_factory=list)
    p99_ms: list[float] = field(default_factory=list)
    rps: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)


def measure_latency(target: Target, requests: int) -> None:
    asyncio.run(_drive(target.urls, 1, lambda sent: sent >= requests // 10))  # warm-up
    latencies, errors = asyncio.run(_drive(target.urls, 1, lambda sent: sent >= requests))
    assert errors == 0, f"{target.name}: {errors} failed requests"
    latencies.sort()
    target.p50_ms.append(1000 * latencies[len(latencies) // 2])
    target.p99_ms.append(1000 * latencies[int(len(latencies) * 0.99)])


def measure_throughput(target: Target, concurrency: int, clients: int, duration: float) -> None:
    context = multiprocessing.get_context("spawn")
    queue: multiprocessing.Queue = context.Queue()
    per_client = max(1, concurrency // clients)
    cpu_before = _cpu_seconds(target.pid) if target.pid else 0.0
    started = time.monotonic()
    workers = [
        context.Process(target=_load_process, args=(target.urls, per_client, duration, queue))
        for _ in range(clients)
    ]
    for worker in workers:
        worker.start()
    results = [queue.get(timeout=duration + 60) for _ in workers]
    for worker in workers:
        worker.join()
    elapsed = time.monotonic() - started
    answered = sum(count for count, _ in results)
    assert sum(errors for _, errors in results) == 0, f"{target.name}: failed requests under load"
    target.rps.append(answered / duration)
    if target.pid:
        target.cpu_us.append(1e6 * (_cpu_seconds(target.pid) - cpu_before) / answered)
    logger.info("%s: %d answers in %.1fs", target.name, answered, elapsed)


def _spawn(argv: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=log.open("wb"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--engines", type=int, default=3)
    parser.add_argument("--latency-requests", type=int, default=2000)
    parser.add_argument("--duration", type=float, default=5.0, help="Seconds of each throughput run.")
    parser.add_argument(
        "--concurrency", type=int, default=64, help="Connections in flight in throughput runs."
    )
    parser.add_argument(
        "--clients", type=int, default=2, help="Load-generator processes for throughput runs."
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--router-processes",
        type=int,
        default=4,
        help="Also measure our router with this many --workers processes (needs a redis-server; 1: skip).",
    )
    parser.add_argument("--log-dir", type=Path, default=Path("outputs/bench_router"))
    args = parser.parse_args(argv)
    setup_logging("INFO", service="bench")
    args.log_dir.mkdir(parents=True, exist_ok=True)
    python = sys.executable
    processes: list[subprocess.Popen] = []
    redis = None
    try:
        engine_ports = [free_port() for _ in range(args.engines)]
        for port in engine_ports:
            processes.append(
                _spawn(
                    [python, "-m", "router.echo_upstream", "--port", str(port)],
                    args.log_dir / f"echo-{port}.log",
                )
            )
        engine_urls = [f"http://127.0.0.1:{port}" for port in engine_ports]
        for url in engine_urls:
            wait_http_ok(f"{url}/health", timeout=60)

        registry_flags: list[str] = []
        try:
            redis = EmbeddedRedis(dir=args.log_dir / "redis")
            registry_flags = ["--redis-url", redis.url]
        except RedisServerNotFoundError:
            logger.warning("no redis-server: our router runs with its in-process registry")
        targets = [Target("engine directly (baseline)", engine_urls)]
        variants = [("round_robin", 1), ("cache_aware", 1)]
        if registry_flags and args.router_processes > 1:
            variants.append(("round_robin", args.router_processes))
        for policy, workers in variants:
            port = free_port()
            router = _spawn(
                [python, "-m", "services.cli", "serve", "router", "--port", str(port), "--policy", policy]
                + ["--workers", str(workers), "--log-level", "WARNING", *registry_flags]
                + ["--worker-urls", *engine_urls],
                args.log_dir / f"router-{policy}-{workers}.log",
            )
            processes.append(router)
            wait_http_ok(f"http://127.0.0.1:{port}/health", timeout=60)
            name = f"slime router ({policy}{f', {workers} processes' if workers > 1 else ''})"
            targets.append(Target(name, [f"http://127.0.0.1:{port}"], router.pid))
        port = free_port()
        sglang = _spawn(
            [python, "-m", "sglang_router.launch_router", "--host", "127.0.0.1", "--port", str(port)]
            + ["--policy", "round_robin", "--log-level", "warn", "--prometheus-port", str(free_port())]
            + ["--worker-urls", *engine_urls],
            args.log_dir / "sglang-router.log",
        )
        processes.append(sglang)
        wait_http_ok(f"http://127.0.0.1:{port}/health", timeout=60)
        targets.append(Target("sglang-router (round_robin)", [f"http://127.0.0.1:{port}"], sglang.pid))
        for target in targets[1:]:
            # Each router must answer before it is measured (workers registered and healthy).
            deadline = time.monotonic() + 60
            while asyncio.run(_drive(target.urls, 1, lambda sent: sent >= 1))[1]:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{target.name} does not serve /generate")
                time.sleep(0.5)

        for round_index in range(args.rounds):
            logger.info("round %d/%d", round_index + 1, args.rounds)
            for target in targets:
                measure_latency(target, args.latency_requests)
            for target in targets:
                measure_throughput(target, args.concurrency, args.clients, args.duration)
        report(targets, args)
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
        if redis is not None:
            redis.stop()
    return 0


def report(targets: list[Target], args: argparse.Namespace) -> None:
    median = statistics.median
    base = targets[0]
    sglang = targets[-1]
    lines = [
        f"engines: {args.engines} EchoUpstream; latency: {args.latency_requests} sequential requests; throughput: "
        f"{args.concurrency} connections from {args.clients} processes for {args.duration:g}s; "
        f"medians of {args.rounds} rounds; host: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}",
        "",
        "| target | p50 ms | p99 ms | added p50 ms | added p99 ms | requests/s | vs sglang-router | router CPU us/request |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for target in targets:
        p50, p99, rps = median(target.p50_ms), median(target.p99_ms), median(target.rps)
        added = "" if target is base else f"{p50 - median(base.p50_ms):.3f}"
        added99 = "" if target is base else f"{p99 - median(base.p99_ms):.3f}"
        ratio = "" if target is base else f"{rps / median(sglang.rps):.2f}x"
        cpu = f"{median(target.cpu_us):.0f}" if target.cpu_us else ""
        lines.append(
            f"| {target.name} | {p50:.3f} | {p99:.3f} | {added} | {added99} | {rps:.0f} | {ratio} | {cpu} |"
        )
    print("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
