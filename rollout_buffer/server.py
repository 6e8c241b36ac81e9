"""``slime serve rollout-buffer``: the HTTP API (slime's and v1), the gRPC BufferService and rollout workers.

The service keeps nothing in its own memory that a client was told is stored, so any number of replicas can
serve one Redis, and a restarted replica carries on where it stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError

from protos import slime_pb2_grpc
from rollout_buffer import api_slime, api_v1, metrics
from rollout_buffer.arguments import parse_args
from rollout_buffer.asgi_front import with_direct_routes
from rollout_buffer.generators import GeneratorRegistry
from rollout_buffer.grpc_service import BufferServicer
from rollout_buffer.service import BufferService, ServiceSettings
from rollout_buffer.store import BufferStore, StoreLimits
from services.core.child import wrap
from services.core.grpc_util import create_grpc_server
from services.core.http_app import ASGIApp, create_app, error_body, run_app
from services.core.logging_setup import setup_logging
from services.core.redis_util import redact_url, redis_from_url

logger = logging.getLogger(__name__)

SERVICE = "rollout-buffer"


@dataclass
class BufferConfig:
    """Everything the API process needs, gathered from the flags (or built directly by tests and benchmarks)."""

    redis_url: str
    limits: StoreLimits = field(default_factory=StoreLimits)
    settings: ServiceSettings = field(default_factory=ServiceSettings)
    registry: GeneratorRegistry = field(default_factory=GeneratorRegistry)
    auth_token: str | None = None
    max_body_bytes: int = 64 << 20
    host: str = "127.0.0.1"
    grpc_port: int | None = None
    # Several API processes share the gRPC port (--http-workers); off otherwise, so a taken port is an error.
    grpc_reuse_port: bool = False
    housekeeping_interval_s: float = 1.0

    @classmethod
    def from_args(cls, args: argparse.Namespace, redis_url: str) -> BufferConfig:
        return cls(
            redis_url=redis_url,
            limits=StoreLimits(
                group_size=args.n_samples_per_prompt,
                max_items=args.buffer_max_items,
                max_bytes=args.buffer_max_bytes,
                dedup_ttl_s=args.dedup_ttl,
                lease_timeout_s=args.lease_timeout,
                group_timeout_s=args.group_timeout,
                expiry_action=args.group_expiry_action,
            ),
            settings=ServiceSettings(
                run_id=args.run_id,
                task_type=args.rollout_task_type,
                retry_after_s=args.retry_after,
                grpc_port=args.grpc_port,
            ),
            registry=GeneratorRegistry.discover(args.generator_dir, args.generator_module),
            auth_token=args.auth_token,
            max_body_bytes=args.max_body_bytes,
            host=args.host,
            grpc_port=args.grpc_port,
            grpc_reuse_port=args.http_workers > 1,
        )


class _RejectionCounter:
    """Counts the refusals the shared middleware answers itself (401, 413) as rejected inputs."""

    _REASONS = {401: "unauthorized", 413: "too_large"}

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def watch(message) -> None:
            if message["type"] == "http.response.start" and message["status"] in self._REASONS:
                metrics.REJECTED.labels(self._REASONS[message["status"]]).inc()
            await send(message)

        await self.app(scope, receive, watch)


def build_app(config: BufferConfig) -> ASGIApp:
    """The buffer's app (FastAPI behind its front); its lifespan connects to Redis, serves gRPC and runs the
    housekeeping loop."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        redis_client = redis_from_url(config.redis_url)
        store = BufferStore(redis_client, config.limits, redis_url=config.redis_url)
        service = BufferService(store, config.registry, config.settings)
        app.state.buffer = service
        grpc_server = None
        if config.grpc_port is not None:
            grpc_server = create_grpc_server(
                config.grpc_port, config.host, options=[("grpc.so_reuseport", int(config.grpc_reuse_port))]
            )
            slime_pb2_grpc.add_BufferServiceServicer_to_server(
                BufferServicer(service, auth_token=config.auth_token), grpc_server
            )
            await grpc_server.start()
        housekeeping = asyncio.create_task(service.housekeeping_loop(config.housekeeping_interval_s))
        logger.info(
            "rollout buffer on run %s, Redis %s, gRPC port %s",
            config.settings.run_id,
            redact_url(config.redis_url),
            config.grpc_port,
        )
        try:
            yield
        finally:
            housekeeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await housekeeping
            if grpc_server is not None:
                await grpc_server.stop(grace=2.0)
            await store.aclose()
            await redis_client.aclose()

    app = create_app(
        SERVICE, auth_token=config.auth_token, max_body_bytes=config.max_body_bytes, lifespan=lifespan
    )
    app.include_router(api_slime.build_router())
    app.include_router(api_v1.build_router())
    retry_after = str(config.settings.retry_after_s)

    async def on_redis_error(request: Request, exc: RedisError) -> JSONResponse:
        logger.warning("Redis error on %s %s: %s", request.method, request.url.path, exc)
        message = (
            f"the buffer's store (Redis at {redact_url(config.redis_url)}) is unavailable: "
            f"{type(exc).__name__}: {exc}; nothing was stored, retry after {retry_after}s"
        )
        return JSONResponse(
            error_body("store_unavailable", message, None, request.scope.get("state", {}).get("request_id")),
            status_code=503,
            headers={"Retry-After": retry_after},
        )

    app.add_exception_handler(RedisError, on_redis_error)
    app.add_middleware(_RejectionCounter)
    return with_direct_routes(app, [api_slime.WRITE_ROUTE])


def _start_worker(argv: Sequence[str], redis_url: str) -> subprocess.Popen:
    # Output is inherited so worker logs land beside the API's; the child dies with this process.
    return subprocess.Popen(
        wrap([sys.executable, "-m", "rollout_buffer.workers", *argv, "--redis-url", redis_url])
    )


def _stop_worker(worker: subprocess.Popen, timeout: float = 10.0) -> None:
    if worker.poll() is not None:
        return
    worker.terminate()
    try:
        worker.wait(timeout)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait()


def _supervise_workers(workers: list[subprocess.Popen], argv: Sequence[str], redis_url: str) -> None:
    """Keep the worker processes running until SIGTERM/SIGINT (the --no-api mode)."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        for i, worker in enumerate(workers):
            if worker.poll() is not None:
                logger.warning(
                    "rollout worker pid %d exited with code %s; restarting it", worker.pid, worker.returncode
                )
                workers[i] = _start_worker(argv, redis_url)


_ARGV_ENV = "SLIME_ROLLOUT_BUFFER_ARGV"


def _freeze_startup_objects() -> None:
    """Exempt what the API process has built so far from garbage collection, for the process's lifetime.

    The imported modules, the app, its routes and models (about 90k objects) live as long as the process, yet
    every full collection scanned them again: under ingestion load that was a 50 ms pause about twice a second
    on the bench host; frozen, a full collection takes about 3 ms. Called by the process entry points only,
    not by build_app, so that a test process serving many apps does not freeze them all.
    """
    gc.collect()
    gc.freeze()


def app_from_environ() -> ASGIApp:
    """The app of one of several API processes (--http-workers): built from the argv the parent passed on."""
    args = parse_args(json.loads(os.environ[_ARGV_ENV]))
    setup_logging(args.log_level, service=SERVICE)
    app = build_app(BufferConfig.from_args(args, args.redis_url))
    _freeze_startup_objects()
    return app


def _serve_api(args: argparse.Namespace, argv: Sequence[str], config: BufferConfig) -> None:
    if args.http_workers == 1:
        app = build_app(config)
        _freeze_startup_objects()
        run_app(app, args.host, args.port, log_level=args.log_level)
        return
    # Several processes on one port; each also serves gRPC on the shared --grpc-port (SO_REUSEPORT).
    os.environ[_ARGV_ENV] = json.dumps([*argv, "--redis-url", config.redis_url])
    uvicorn.run(
        "rollout_buffer.server:app_from_environ",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.http_workers,
        log_level=args.log_level.lower(),
        access_log=False,
        timeout_graceful_shutdown=10,
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    setup_logging(args.log_level, service=SERVICE)
    embedded = None
    redis_url = args.redis_url
    if redis_url is None:
        from services.core.embedded_redis import EmbeddedRedis

        embedded = EmbeddedRedis(appendonly=True, dir=args.redis_dir)
        redis_url = embedded.url
        logger.info(
            "no --redis-url: started an embedded redis-server with AOF at %s (dir %s)",
            redis_url,
            embedded.dir,
        )
    workers: list[subprocess.Popen] = []
    try:
        config = None if args.no_api else BufferConfig.from_args(args, redis_url)
        workers = [_start_worker(argv, redis_url) for _ in range(args.rollout_workers)]
        if config is None:
            _supervise_workers(workers, argv, redis_url)
        else:
            _serve_api(args, argv, config)
    except ValueError as exc:
        logger.error("%s", exc)
        return 2
    finally:
        for worker in workers:
            _stop_worker(worker)
        if embedded is not None:
            embedded.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
