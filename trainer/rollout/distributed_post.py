"""``--use-distributed-post``: generation requests posted by several rollout-worker processes instead of one client.

slime's flag starts ``--num-gpus-per-node`` HTTP poster actors on every node and sends its ``/generate`` POSTs to
them round-robin, so that one process's event loop and connection pool do not bound a large rollout. Here the
posting already happens in rollout workers that share the run's task stream (one Redis consumer group), so the
flag decides how many worker processes the embedded stack starts (``--num-gpus-per-node``, each with its own
HTTP client; each takes its share of a rollout's tasks, ``StreamQueue.read_share``). Every rollout logs how many
workers consume the stream (``perf/rollout_workers``), and with the flag on the driver warns when one worker did
all the posting (a deployed buffer started with a single worker).
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass

import redis.asyncio as aioredis

from rollout_buffer.tasks import task_queue

logger = logging.getLogger(__name__)

_WARNED_RUNS: set[str] = set()


@dataclass(frozen=True)
class Posters:
    """The live consumers of a run's task stream: each is one rollout-worker process with its own HTTP client."""

    consumers: tuple[str, ...]

    @property
    def hosts(self) -> tuple[str, ...]:
        # Worker names are ``<hostname>-<pid>-<suffix>`` (rollout_buffer.workers.RolloutWorker).
        return tuple(sorted({name.rsplit("-", 2)[0] for name in self.consumers}))

    def __len__(self) -> int:
        return len(self.consumers)


def poster_count(args: argparse.Namespace) -> int:
    """Rollout-worker processes the embedded stack starts: one, or ``--num-gpus-per-node`` with the flag on (the
    embedded stack is one host; slime starts that many posters per node)."""
    if not args.use_distributed_post:
        return 1
    if args.num_gpus_per_node < 1:
        raise ValueError(
            f"--use-distributed-post starts --num-gpus-per-node rollout workers: --num-gpus-per-node must be "
            f">= 1, got {args.num_gpus_per_node}"
        )
    return args.num_gpus_per_node


async def live_posters(redis: aioredis.Redis, run_id: str) -> Posters:
    """The consumers of the run's task stream that read in the last ``LIVE_CONSUMER_IDLE_MS`` (a worker is listed
    from its start)."""
    return Posters(tuple(sorted(await task_queue(redis, run_id).live_consumers())))


def warn_if_single_poster(args: argparse.Namespace, posters: Posters, tasks: int) -> None:
    """With the flag on, say so (once per run) when one worker took every task of a rollout that had several."""
    if args.use_distributed_post and tasks >= 2 and len(posters) < 2 and args.run_id not in _WARNED_RUNS:
        _WARNED_RUNS.add(args.run_id)
        logger.warning(
            "--use-distributed-post: one rollout worker (%s) posted every generation of the last rollout; "
            "start more on each host with `slime serve rollout-buffer --no-api --rollout-workers N "
            "--redis-url ... --run-id %s` (the embedded stack starts --num-gpus-per-node of them)",
            ", ".join(posters.consumers) or "none seen",
            args.run_id,
        )
