"""``slime train`` and ``slime train-async``: one RL run, in slime's order of events.

Per rollout: generate (prompt groups → task stream → rollout workers → engines via the router → reward model →
rollout buffer), turn the scored samples into a training batch (reward post-processing), train, acknowledge the
groups, save, push the new weights to every engine, evaluate. ``train-async`` keeps the next rollout in flight while
training and pushes weights every ``--update-weights-interval`` rollouts, as slime's ``train_async.py``.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from services.core.arguments import parse_args
from services.core.logging_setup import setup_logging

logger = logging.getLogger(__name__)

SYNC = "sync"
ASYNC = "async"


def _check_backend(args: argparse.Namespace, parser_prog: str) -> None:
    if args.train_backend == "megatron":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit(
                f"{parser_prog}: error: --train-backend megatron (the default) needs a CUDA GPU and megatron-core; "
                "on this machine use --train-backend fsdp (the torch backend, CPU or GPU)"
            )
        raise SystemExit(
            f"{parser_prog}: error: --train-backend megatron is not available in this build; use --train-backend fsdp"
        )
    if args.hf_checkpoint is None:
        raise SystemExit(f"{parser_prog}: error: --hf-checkpoint is required (the model to train and serve)")
    if args.rollout_global_dataset and args.prompt_data is None and not args.load_debug_rollout_data:
        raise SystemExit(
            f"{parser_prog}: error: --prompt-data is required (or --disable-rollout-global-dataset)"
        )


def main(argv: Sequence[str] | None = None, mode: str = SYNC) -> int:
    prog = "slime train-async" if mode == ASYNC else "slime train"
    args = parse_args(list(argv) if argv is not None else None, prog=prog)
    setup_logging(args.log_level, service="trainer")
    _check_backend(args, prog)
    if mode == ASYNC and args.colocate:
        raise SystemExit(f"{prog}: error: --colocate cannot be used with train-async (slime forbids it too)")
    from trainer.run import RLRun

    with RLRun(args, mode=mode) as run:
        run.run()
    return 0


def run_in_background(fn: Any, *args: Any) -> Future:
    """One worker thread for the in-flight rollout of ``train-async``."""
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollout")
    future = executor.submit(fn, *args)
    future.add_done_callback(lambda _: executor.shutdown(wait=False))
    return future


def output_dir(args: argparse.Namespace) -> Path:
    return Path(args.output_dir or Path("outputs") / args.run_id)


def elapsed(start: float) -> float:
    return time.perf_counter() - start
