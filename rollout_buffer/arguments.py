"""Flags of ``slime serve rollout-buffer`` and its rollout workers: slime's own (which custom generate and reward
functions read from ``args``), the service flags, and the buffer's store, API and worker settings.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from services.core.arguments import (
    SlimeArgumentParser,
    add_service_arguments,
    add_slime_arguments,
    parse_with_passthrough,
)

DEFAULT_PORT = 8889


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def add_buffer_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    group = parser.add_argument_group("Rollout buffer service")
    group.add_argument(
        "--grpc-port",
        type=int,
        default=None,
        help="Port of the gRPC BufferService (FetchGroups/Ack); defaults to the HTTP port + 1.",
    )
    group.add_argument(
        "--buffer-max-items",
        type=_positive_int,
        default=1_000_000,
        help="Most items held (stored and not yet acknowledged) per run; writes beyond it get 429 + Retry-After.",
    )
    group.add_argument(
        "--buffer-max-bytes",
        type=_positive_int,
        default=4 << 30,
        help="Most payload bytes held per run; writes beyond it get 429 + Retry-After.",
    )
    group.add_argument(
        "--max-body-bytes",
        type=_positive_int,
        default=64 << 20,
        help="Largest HTTP request body accepted; larger ones get 413.",
    )
    group.add_argument(
        "--group-timeout",
        type=_positive_float,
        default=None,
        help="Seconds an incomplete group may go without a new item before it expires; unset: never.",
    )
    group.add_argument(
        "--group-expiry-action",
        choices=["drop", "deliver"],
        default="drop",
        help="What an expired incomplete group becomes: dropped, or delivered as a partial group.",
    )
    group.add_argument(
        "--lease-timeout",
        type=_positive_float,
        default=300.0,
        help="Seconds a leased group stays with its reader before it returns to the buffer unacknowledged.",
    )
    group.add_argument(
        "--dedup-ttl",
        type=_positive_float,
        default=86_400.0,
        help="Seconds a stored uid is remembered, so that a repeated write of it is recognised as a duplicate.",
    )
    group.add_argument(
        "--retry-after",
        type=_positive_int,
        default=1,
        help="Seconds a client told 429 (buffer full) or 503 (Redis unreachable) should wait before retrying.",
    )
    group.add_argument(
        "--generator-dir",
        action="append",
        default=[],
        help="Directory of slime generator modules (TASK_TYPE, run_rollout, ...) for /start_rollout; repeatable.",
    )
    group.add_argument(
        "--generator-module",
        action="append",
        default=[],
        help="Dotted path of a slime generator module for /start_rollout; repeatable.",
    )
    group.add_argument(
        "--http-workers",
        type=_positive_int,
        default=1,
        help="API processes sharing the port (the store is in Redis, so they need no coordination).",
    )
    group.add_argument(
        "--rollout-workers",
        type=_non_negative_int,
        default=0,
        help="Rollout worker processes to run beside the API, consuming the run's task stream.",
    )
    group.add_argument(
        "--worker-concurrency",
        type=_positive_int,
        default=64,
        help="Prompt groups one rollout worker process generates at the same time.",
    )
    group.add_argument(
        "--worker-reclaim-idle",
        type=_positive_float,
        default=60.0,
        help="Seconds a task may go unacknowledged by a silent worker before another worker takes it over.",
    )
    group.add_argument(
        "--no-api",
        action="store_true",
        default=False,
        help="Run only the rollout workers (--rollout-workers), no HTTP or gRPC API (extra worker hosts).",
    )
    group.add_argument(
        "--redis-dir",
        type=str,
        default=None,
        help="Directory of the embedded Redis' append-only file when --redis-url is unset (default: a temp dir).",
    )
    return parser


def build_parser(prog: str = "slime serve rollout-buffer") -> SlimeArgumentParser:
    parser = SlimeArgumentParser(
        prog=prog,
        description="Durable rollout buffer: slime's buffer API, a versioned API, gRPC fetch and rollout workers.",
        fromfile_prefix_chars="@",
        allow_abbrev=False,
    )
    add_slime_arguments(parser, require_rollout_batch_size=False)
    add_service_arguments(parser)
    return add_buffer_arguments(parser)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parse_with_passthrough(parser, argv)
    if args.port is None:
        args.port = DEFAULT_PORT
    if args.grpc_port is None:
        args.grpc_port = args.port + 1
    for name in ("port", "grpc_port"):
        if not 1 <= getattr(args, name) <= 65535:
            parser.error(f"--{name.replace('_', '-')} must be in 1..65535, got {getattr(args, name)}")
    if args.port == args.grpc_port:
        parser.error(f"--grpc-port must differ from --port ({args.port})")
    if args.no_api and args.rollout_workers == 0:
        parser.error("--no-api runs only rollout workers: give --rollout-workers N (N >= 1)")
    if args.n_samples_per_prompt < 1:
        parser.error(f"--n-samples-per-prompt must be >= 1, got {args.n_samples_per_prompt}")
    return args
