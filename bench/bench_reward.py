"""Reward-model throughput: math grading through HTTP and gRPC at 1, 2 and 4 grader worker processes, against
grading in this process (the baseline), and the share of CPU time spent outside grading.

    python bench/bench_reward.py [--items 2000] [--batch 32] [--concurrency 8] [--workers 1,2,4]

Baselines, in the same invocation: the grader called directly in this process (no isolation), and the reward
hub with its process pool in this process (isolation, no protocol). Each worker count then gets its own
`slime serve reward-model` process on loopback, driven over HTTP (batches and single items, as slime's remote_rm
sends them) and over gRPC. Every phase runs after a warm-up; the faster of two runs counts.

Besides items/s (wall clock), each phase reports the CPU seconds it cost per item across this process (the
client), the server and its grader workers, and which share of that CPU was spent outside the graders: protocol
handling, serialisation and the pool's pipes. CPU time is what stays comparable on a shared, loaded machine.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
from prometheus_client import REGISTRY

from services.core.net import free_port, wait_http_ok
from services.core.sample import Sample
from services.reward_model.client import RewardGrpcClient, RewardHttpClient
from services.reward_model.graders import grade
from services.reward_model.hub import RewardHub
from services.reward_model.pool import GraderPool
from services.reward_model.server import parse_args

ROOT = Path(__file__).resolve().parents[1]
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
logger = logging.getLogger("bench_reward")

# (given answer, label): string matches, sympy equivalences and wrong answers, as a math RL batch has them.
ANSWERS = [
    ("\\frac{3}{4}", "0.75"),
    ("0.75", "\\frac{3}{4}"),
    ("12", "12"),
    ("\\sqrt{8}", "2\\sqrt{2}"),
    ("(1, 2]", "(1,2]"),
    ("1,000", "1000"),
    ("5", "6"),
    ("x^2+2x+1", "(x+1)^2"),
]
EXPECTED = [1, 1, 1, 1, 1, 1, 0, 1]
REASONING = "We compute the quantity step by step, checking each intermediate result. " * 20

Send = Callable[[list[Sample]], Awaitable[list[float]]]


def workload(count: int) -> list[Sample]:
    return [
        Sample(prompt="Solve.", response=f"{REASONING}\\boxed{{{given}}}", label=label)
        for given, label in (ANSWERS[i % len(ANSWERS)] for i in range(count))
    ]


def tree_cpu_seconds(root: int) -> float:
    """User + system CPU seconds of ``root`` and every live descendant (grader workers, the forkserver)."""
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(entry.name)
        parents[pid] = int(fields[1])
        cpu[pid] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    total, frontier = 0.0, [root]
    while frontier:
        pid = frontier.pop()
        total += cpu.get(pid, 0.0)
        frontier.extend(child for child, parent in parents.items() if parent == pid)
    return total


@dataclass
class Phase:
    name: str
    workers: int
    items: int
    wall_s: float
    cpu_s: float
    grade_cpu_s: float

    @property
    def items_per_s(self) -> float:
        return self.items / self.wall_s

    @property
    def cpu_ms_per_item(self) -> float:
        return 1000 * self.cpu_s / self.items

    @property
    def outside_share(self) -> float:
        return max(0.0, 1.0 - self.grade_cpu_s / self.cpu_s)


def baseline(samples: list[Sample]) -> Phase:
    for sample in samples[: len(ANSWERS)]:
        grade("math", sample.response, sample.label)  # imports sympy, fills its caches
    best: Phase | None = None
    for _ in range(2):
        start, start_cpu = time.perf_counter(), time.process_time()
        for sample in samples:
            grade("math", sample.response, sample.label)
        wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
        phase = Phase("grader called in-process (baseline)", 1, len(samples), wall, cpu, cpu)
        best = phase if best is None or phase.wall_s < best.wall_s else best
    assert best is not None
    return best


def grade_cpu_seconds(base_url: str | None) -> float:
    """The pool's grading CPU counter: the server's, or this process's own when ``base_url`` is None."""
    name = "slime_reward_model_grade_cpu_seconds_total"
    if base_url is None:
        return REGISTRY.get_sample_value(name) or 0.0
    match = re.search(rf"^{name} ([0-9.e+-]+)$", httpx.get(f"{base_url}/metrics").text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


async def drive(send: Send, samples: list[Sample], batch: int, concurrency: int) -> None:
    """Send ``samples`` in batches of ``batch`` with ``concurrency`` requests in flight; check every reward."""
    chunks = [(i, samples[i : i + batch]) for i in range(0, len(samples), batch)]

    async def sender() -> None:
        while chunks:
            offset, chunk = chunks.pop()
            expected = [EXPECTED[(offset + j) % len(EXPECTED)] for j in range(len(chunk))]
            rewards = await send(chunk)
            if rewards != expected:
                raise AssertionError(f"wrong rewards {rewards} for items {offset}..{offset + len(chunk)}")

    await asyncio.gather(*(sender() for _ in range(concurrency)))


@dataclass
class Server:
    """A `slime serve reward-model` process under test."""

    process: subprocess.Popen
    url: str
    grpc_addr: str


def total_cpu_seconds() -> float:
    """CPU of this process (the client) and its descendants: the server, its workers, the hub's own pool."""
    return tree_cpu_seconds(os.getpid())


async def timed(
    name: str,
    workers: int,
    samples: list[Sample],
    send: Send,
    batch: int,
    concurrency: int,
    server: Server | None,
) -> Phase:
    """Warm up, then the faster of two runs; CPU of this process, the server's process tree and the pool."""
    url = server.url if server else None
    await drive(send, samples[: batch * 2 * concurrency], batch, concurrency)
    best: Phase | None = None
    for _ in range(2):
        grade_before, cpu_before = grade_cpu_seconds(url), total_cpu_seconds()
        start = time.perf_counter()
        await drive(send, samples, batch, concurrency)
        wall = time.perf_counter() - start
        cpu = total_cpu_seconds() - cpu_before
        phase = Phase(name, workers, len(samples), wall, cpu, grade_cpu_seconds(url) - grade_before)
        best = phase if best is None or phase.wall_s < best.wall_s else best
    assert best is not None
    return best


async def hub_phase(workers: int, samples: list[Sample], batch: int, concurrency: int) -> Phase:
    """The reward hub and its grader pool in this process: isolation without any protocol."""
    args = parse_args(["--rm-type", "math", "--num-workers", str(workers)])
    hub = RewardHub(args, pool=GraderPool(workers, args.grader_timeout))

    async def send(chunk: list[Sample]) -> list[float]:
        return [outcome.value for outcome in await hub.score_batch(chunk)]

    try:
        return await timed("hub + pool in-process", workers, samples, send, batch, concurrency, None)
    finally:
        await hub.aclose()


async def server_phases(
    server: Server, workers: int, samples: list[Sample], args: argparse.Namespace
) -> list[Phase]:
    http = RewardHttpClient(server.url)
    grpc_client = RewardGrpcClient(server.grpc_addr)

    async def http_batch(chunk: list[Sample]) -> list[float]:
        return [outcome.value for outcome in await http.score_batch(chunk)]

    async def grpc_batch(chunk: list[Sample]) -> list[float]:
        return [outcome.value for outcome in await grpc_client.score(chunk)]

    async def http_single(chunk: list[Sample]) -> list[float]:
        return [(await http.score(chunk[0])).value]

    plans: list[tuple[str, Send, int, int]] = [
        (f"HTTP /reward/batch, {args.batch}/request", http_batch, args.batch, args.concurrency),
        (f"gRPC Score, {args.batch}/request", grpc_batch, args.batch, args.concurrency),
        ("HTTP /reward, 1/request (remote_rm)", http_single, 1, args.concurrency * 4),
    ]
    try:
        return [
            await timed(name, workers, samples, send, batch, concurrency, server)
            for name, send, batch, concurrency in plans
        ]
    finally:
        await http.aclose()
        await grpc_client.close()


def start_server(workers: int) -> Server:
    port, grpc_port = free_port(), free_port()
    slime = str(Path(sys.executable).with_name("slime"))
    command = [slime, "serve", "reward-model", "--rm-type", "math", "--port", str(port)]
    command += ["--grpc-port", str(grpc_port), "--num-workers", str(workers)]
    command += ["--max-concurrency", "100000", "--log-level", "WARNING"]
    server = Server(subprocess.Popen(command, cwd=ROOT), f"http://127.0.0.1:{port}", f"127.0.0.1:{grpc_port}")
    wait_http_ok(f"{server.url}/health", timeout=120)
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=8, help="Batch requests in flight.")
    parser.add_argument("--workers", type=str, default="1,2,4")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    samples = workload(args.items)
    base = baseline(samples)
    rows = [base]
    for workers in (int(w) for w in args.workers.split(",")):
        rows.append(asyncio.run(hub_phase(workers, samples, args.batch, args.concurrency)))
        server = start_server(workers)
        try:
            rows.extend(asyncio.run(server_phases(server, workers, samples, args)))
        finally:
            server.process.terminate()
            server.process.wait(30)
    logger.info(
        "%d math items, batches of %d, %d batch requests in flight; %d CPU cores, load average %.1f",
        args.items,
        args.batch,
        args.concurrency,
        os.cpu_count(),
        os.getloadavg()[0],
    )
    logger.info("| path | workers | items/s | vs baseline | CPU ms/item | CPU outside grading |")
    logger.info("|---|---|---|---|---|---|")
    for row in rows:
        logger.info(
            "| %s | %d | %.0f | %.2fx | %.2f | %.0f%% |",
            row.name,
            row.workers,
            row.items_per_s,
            row.items_per_s / base.items_per_s,
            row.cpu_ms_per_item,
            100 * row.outside_share,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
