"""``slime serve rollout-engine``: one inference server behind SGLang's HTTP API, either the built-in torch engine
or a supervised SGLang server (``--engine-backend auto|builtin|sglang``)."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import logging
import os
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from fastapi import FastAPI

from services.core.arguments import (
    add_service_arguments,
    add_slime_arguments,
    new_parser,
    parse_with_passthrough,
)
from services.core.http_app import create_app, run_app
from services.core.logging_setup import setup_logging
from services.core.supervisor import usable_cpus

logger = logging.getLogger(__name__)

DEFAULT_PORT = 30001
SERVICE = "rollout-engine"

# --sglang-* settings the built-in engine honours (same meaning as in SGLang); others only reach SGLang.
BUILTIN_SGLANG_FIELDS = (
    "context_length",
    "max_running_requests",
    "chunked_prefill_size",
    "mem_fraction_static",
    "disable_cuda_graph",
    "served_model_name",
    "rl_on_policy_target",
)


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser(
        prog="slime serve rollout-engine",
        description="One rollout engine behind SGLang's HTTP API: the built-in torch engine or a supervised SGLang.",
    )
    add_slime_arguments(parser, groups=["Cluster", "Rollout", "SGLang"])
    add_service_arguments(parser)
    group = parser.add_argument_group("Rollout engine")
    group.add_argument(
        "--num-threads",
        type=int,
        default=None,
        help="torch CPU threads of the built-in engine (torch.set_num_threads); all cores when unset.",
    )
    group.add_argument(
        "--engine-device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="Device of the built-in engine: CUDA when available (auto), or forced.",
    )
    group.add_argument(
        "--engine-dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        default="auto",
        help="Weight dtype of the built-in engine: the checkpoint's on GPU, float32 on CPU (auto), or forced.",
    )
    group.add_argument(
        "--kv-cache-memory-gb",
        type=float,
        default=None,
        help="KV-cache budget of the built-in engine in GiB (default: from --sglang-mem-fraction-static on GPU, "
        "a quarter of free RAM up to 4 GiB on CPU). --sglang-max-running-requests overrides the slot count.",
    )
    group.add_argument(
        "--supervised-child",
        choices=["sglang", "builtin"],
        default="sglang",
        help="What --engine-backend sglang supervises: sglang.launch_server, or the built-in engine as a child "
        "process (crash isolation and restarts without SGLang).",
    )
    group.add_argument(
        "--child-health-timeout",
        type=float,
        default=900.0,
        help="Seconds a supervised engine may take to answer /health_generate after a (re)start.",
    )
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parse_with_passthrough(parser, argv, sglang=True, megatron=False)
    if not args.hf_checkpoint:
        parser.error("--hf-checkpoint is required: the Hugging Face model directory to serve")
    if not Path(args.hf_checkpoint).is_dir():
        parser.error(f"--hf-checkpoint {args.hf_checkpoint!r} is not a directory")
    if args.num_threads is not None and args.num_threads < 1:
        parser.error(f"--num-threads must be >= 1, got {args.num_threads}")
    return args


def choose_backend(args: argparse.Namespace) -> str:
    if args.engine_backend != "auto":
        return args.engine_backend
    import torch

    if importlib.util.find_spec("sglang") is not None and torch.cuda.is_available():
        return "sglang"
    return "builtin"


def build_builtin_app(args: argparse.Namespace) -> FastAPI:
    """Load the model and return the app serving it (the scheduler starts with the app)."""
    import torch

    from services.rollout_engine import http_api, openai_api
    from services.rollout_engine.engine import BuiltinEngine, EngineSettings

    torch.set_num_threads(args.num_threads or usable_cpus())
    extra = dict(args.sglang_passthrough)
    ignored = sorted(set(extra) - set(BUILTIN_SGLANG_FIELDS) - {"enable_metrics"})
    if ignored:
        logger.warning("the built-in engine ignores these SGLang settings: %s", ", ".join(ignored))
    settings = EngineSettings(
        model_path=args.hf_checkpoint,
        device=args.engine_device,
        dtype=args.engine_dtype,
        context_length=extra.get("context_length") or args.rollout_max_context_len,
        max_running_requests=extra.get("max_running_requests"),
        chunked_prefill_size=extra.get("chunked_prefill_size"),
        mem_fraction_static=args.sglang_mem_fraction_static,
        kv_cache_memory_gb=args.kv_cache_memory_gb,
        random_seed=args.rollout_seed,
        disable_cuda_graph=bool(extra.get("disable_cuda_graph", False)),
        served_model_name=extra.get("served_model_name"),
        rl_on_policy_target=extra.get("rl_on_policy_target"),
    )
    engine = BuiltinEngine(settings)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = create_app(SERVICE, auth_token=args.auth_token, lifespan=lifespan, max_body_bytes=1 << 30)
    app.state.engine = engine
    app.include_router(http_api.router)
    app.include_router(openai_api.router)
    app.add_middleware(http_api.WeightVersionHeader, engine=engine)
    return app


def build_supervisor_app(args: argparse.Namespace) -> FastAPI:
    from services.rollout_engine.supervisor import EngineSupervisor, builtin_child_argv, install, sglang_argv

    if args.supervised_child == "sglang" and importlib.util.find_spec("sglang") is None:
        raise SystemExit(
            "--engine-backend sglang needs the sglang package (pip install 'slime-rl[sglang]'); "
            "use --engine-backend builtin to run the built-in engine"
        )
    build = sglang_argv if args.supervised_child == "sglang" else builtin_child_argv
    log_dir = Path(os.environ.get("SLIME_LOG_DIR", "outputs/logs"))
    supervisor = EngineSupervisor(
        lambda port: build(args, port),
        log_path=log_dir / f"rollout-engine-child-{os.getpid()}.log",
        health_timeout_s=args.child_health_timeout,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        supervisor.start()
        try:
            yield
        finally:
            await app.state.proxy_client.aclose()
            supervisor.stop()

    app = create_app(SERVICE, auth_token=args.auth_token, lifespan=lifespan, max_body_bytes=1 << 30)
    install(app, supervisor)
    return app


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level, service=SERVICE)
    backend = choose_backend(args)
    logger.info("rollout engine backend: %s", backend)
    app = build_builtin_app(args) if backend == "builtin" else build_supervisor_app(args)
    run_app(app, args.host, args.port or DEFAULT_PORT, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
