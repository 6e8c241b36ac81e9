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
        from trainer.backends.megatron_backend.trainer import require_megatron

        require_megatron(parser_prog)
    if args.hf_checkpoint is None:
        raise SystemExit(f"{parser_prog}: error: --hf-checkpoint is required (the model to train and serve)")
    if args.rollout_global_dataset and args.prompt_data is None and not args.load_debug_rollout_data:
        raise SystemExit(
            f"{parser_prog}: error: --prompt-data is required (or --disable-rollout-global-dataset)"
        )


# Flags only the Megatron backend reads; slime's FSDP backend ignores them too.
MEGATRON_ONLY_FLAGS = {
    "use_routing_replay": "--use-routing-replay",
    "custom_megatron_init_path": "--custom-megatron-init-path",
    "custom_megatron_before_log_prob_hook_path": "--custom-megatron-before-log-prob-hook-path",
    "custom_megatron_before_train_step_hook_path": "--custom-megatron-before-train-step-hook-path",
    "use_hf_config_for_megatron": "--use-hf-config-for-megatron",
    "model_name": "--model-name",
    "padded_vocab_size": "--padded-vocab-size",
}


def _check_flags(args: argparse.Namespace, prog: str) -> None:
    """Flags whose mistakes would otherwise surface only after the services are up, or never."""
    import importlib.util
    import os

    import torch

    from services.core.process_group import training_backend
    from trainer import memory_snapshot
    from trainer.rollout.distributed_post import poster_count

    try:
        training_backend(
            args.distributed_backend, torch.device("cuda" if torch.cuda.is_available() else "cpu")
        )
        poster_count(args)
        memory_snapshot.check_flags(args, cuda_available=torch.cuda.is_available())
    except ValueError as exc:
        raise SystemExit(f"{prog}: error: {exc}") from None
    if args.rollout_external and not args.rollout_external_engine_addrs and args.router_url is None:
        raise SystemExit(
            f"{prog}: error: --rollout-external uses engines someone else runs: give their addresses with "
            "--rollout-external-engine-addrs (or a deployed router with --router-url)"
        )
    if args.use_tensorboard and not args.tb_project_name and "TENSORBOARD_DIR" not in os.environ:
        raise SystemExit(f"{prog}: error: --use-tensorboard needs --tb-project-name or $TENSORBOARD_DIR")
    for switch, package in (("use_tensorboard", "tensorboard"), ("use_wandb", "wandb")):
        if getattr(args, switch) and importlib.util.find_spec(package) is None:
            raise SystemExit(
                f"{prog}: error: --{switch.replace('_', '-')} needs the {package} package: "
                f"pip install 'slime-rl[{package}]'"
            )
    if args.train_backend == "fsdp":
        given = [
            flag
            for dest, flag in MEGATRON_ONLY_FLAGS.items()
            if getattr(args, dest, None) not in (None, False)
        ]
        if given:
            logger.warning(
                "%s: read only by --train-backend megatron; the fsdp backend ignores them (as slime's does)",
                ", ".join(given),
            )


def main(argv: Sequence[str] | None = None, mode: str = SYNC) -> int:
    prog = "slime train-async" if mode == ASYNC else "slime train"
    args = parse_args(list(argv) if argv is not None else None, prog=prog)
    setup_logging(args.log_level, service="trainer")
    _check_backend(args, prog)
    _check_flags(args, prog)
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
