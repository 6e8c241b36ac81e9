"""How soon a waiting gRPC ``FetchGroups`` receives a group after its last item is written: the ready signal
(the store's scripts publish on Redis, one subscriber per buffer process wakes the waiters) against the baseline
of polling the store every 50 ms, in the same invocation, trials alternating.

A real redis-server (AOF, as the service runs it) and a buffer process (``python -m rollout_buffer.server``) that
takes the writes over HTTP, as agents send them; this process serves FetchGroups twice on the same store, one
servicer per behaviour, and is also the trainer-side client. A trial writes a group's first item, starts a fetch,
lets it wait a random 100-200 ms, writes the last item and times from the write's 2xx to the group's arrival.

    .venv/bin/python bench/bench_fetch_latency.py [--trials 200] [--poll-ms 50]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import orjson

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from protos import slime_pb2, slime_pb2_grpc  # noqa: E402
from rollout_buffer.generators import GeneratorRegistry  # noqa: E402
from rollout_buffer.grpc_service import BufferServicer  # noqa: E402
from rollout_buffer.service import BufferService, ServiceSettings  # noqa: E402
from rollout_buffer.store import BufferStore, StoreLimits  # noqa: E402
from services.core.embedded_redis import EmbeddedRedis  # noqa: E402
from services.core.grpc_util import create_grpc_server, grpc_channel  # noqa: E402
from services.core.logging_setup import setup_logging  # noqa: E402
from services.core.net import free_port, wait_http_ok  # noqa: E402
from services.core.redis_util import redis_from_url  # noqa: E402

logger = logging.getLogger("bench_fetch_latency")
GROUP_SIZE = 2
SIGNAL = "ready signal"


@dataclass
class Mode:
    name: str
    stub: slime_pb2_grpc.BufferServiceStub
    latencies_ms: list[float] = field(default_factory=list)

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _item(uid: str, instance_id: str) -> bytes:
    return orjson.dumps(
        {
            "uid": uid,
            "instance_id": instance_id,
            "messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
            "reward": 1.0,
            "extra_info": {},
        }
    )


async def _write(http: httpx.AsyncClient, uid: str, instance_id: str) -> None:
    response = await http.post(
        "/buffer/write", content=_item(uid, instance_id), headers={"content-type": "application/json"}
    )
    response.raise_for_status()


async def _fetch_one(stub: slime_pb2_grpc.BufferServiceStub) -> tuple[slime_pb2.Group, float]:
    """One group by FetchGroups, and when it arrived (``time.perf_counter``)."""
    request = slime_pb2.FetchRequest(max_groups=1, min_groups=1, wait_seconds=10)
    received = [(group, time.perf_counter()) async for group in stub.FetchGroups(request, timeout=15)]
    if len(received) != 1:
        raise RuntimeError(f"FetchGroups sent {len(received)} groups, expected 1 within its 10 s wait")
    return received[0]


async def _trial(mode: Mode, http: httpx.AsyncClient, n: int) -> None:
    instance = f"{mode.name}-{n}"
    await _write(http, f"{instance}-a", instance)
    fetch = asyncio.create_task(_fetch_one(mode.stub))
    # A random phase against the baseline's poll timer, as a real rollout's last write has.
    await asyncio.sleep(random.uniform(0.1, 0.2))
    if fetch.done():
        raise RuntimeError(f"trial {instance}: the fetch returned before the group was complete")
    await _write(http, f"{instance}-b", instance)
    written = time.perf_counter()
    group, arrived = await fetch
    mode.latencies_ms.append(1000 * (arrived - written))
    await mode.stub.Ack(slime_pb2.AckRequest(lease_ids=[group.lease_id]), timeout=10)


async def run(args: argparse.Namespace, redis_url: str, writer_url: str) -> list[Mode]:
    redis_client = redis_from_url(redis_url)
    store = BufferStore(redis_client, StoreLimits(group_size=GROUP_SIZE), redis_url=redis_url)
    service = BufferService(store, GeneratorRegistry(), ServiceSettings())
    servers, channels, modes = [], [], []
    for name, poll_seconds in ((SIGNAL, None), (f"poll every {args.poll_ms:g} ms", args.poll_ms / 1000)):
        port = free_port()
        server = create_grpc_server(port)
        slime_pb2_grpc.add_BufferServiceServicer_to_server(
            BufferServicer(service, poll_seconds=poll_seconds), server
        )
        await server.start()
        channel = grpc_channel(f"127.0.0.1:{port}")
        servers.append(server)
        channels.append(channel)
        modes.append(Mode(name, slime_pb2_grpc.BufferServiceStub(channel)))
    try:
        async with httpx.AsyncClient(base_url=writer_url, trust_env=False, timeout=10) as http:
            for n in range(args.warmup):
                for mode in modes:
                    await _trial(mode, http, -1 - n)
            for mode in modes:
                mode.latencies_ms.clear()
            for n in range(args.trials):
                for mode in modes if n % 2 else reversed(modes):
                    await _trial(mode, http, n)
                if (n + 1) % 50 == 0:
                    logger.info("%d/%d trials", n + 1, args.trials)
    finally:
        for channel in channels:
            await channel.close()
        for server in servers:
            await server.stop(grace=None)
        await store.aclose()
        await redis_client.aclose()
    return modes


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trials", type=int, default=200, help="Measured trials per behaviour.")
    parser.add_argument("--warmup", type=int, default=5, help="Unmeasured trials per behaviour first.")
    parser.add_argument("--poll-ms", type=float, default=50.0, help="The baseline's poll interval.")
    args = parser.parse_args()
    setup_logging("INFO", service="bench")

    with EmbeddedRedis(appendonly=True) as redis_server:
        port = free_port()
        writer = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "rollout_buffer.server",
                "--redis-url",
                redis_server.url,
                "--port",
                str(port),
                "--n-samples-per-prompt",
                str(GROUP_SIZE),
                "--log-level",
                "WARNING",
            ],
            cwd=REPO,
        )
        try:
            wait_http_ok(f"http://127.0.0.1:{port}/health", 60)
            modes = asyncio.run(run(args, redis_server.url, f"http://127.0.0.1:{port}"))
        finally:
            writer.terminate()
            writer.wait(30)

    signal, poll = modes
    print(f"\n| write 2xx -> group at the client, {args.trials} trials | p50 ms | p99 ms | mean ms |")
    print("|---|---|---|---|")
    for mode in modes:
        print(
            f"| {mode.name} | {mode.percentile(0.5):.2f} | {mode.percentile(0.99):.2f} | "
            f"{statistics.fmean(mode.latencies_ms):.2f} |"
        )
    print(
        f"\nPoll / signal: p50 {poll.percentile(0.5) / signal.percentile(0.5):.1f}x, "
        f"p99 {poll.percentile(0.99) / signal.percentile(0.99):.1f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
