"""``slime serve router``: the one address every generator talks to. sglang-router's management API
(``/add_worker``, ``/remove_worker``, ``/list_workers``) plus ``/workers``, ``/abort_request`` fan-out and
``/set_weight_version``; every other path is proxied to a HEALTHY worker (see ``router.proxy``)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Sequence
from enum import Enum
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from pydantic import BaseModel, Field, ValidationError, field_validator
from redis.exceptions import RedisError

from router.asgi import ASGIApp, Receive, Scope, Send
from router.health import HealthConfig, HealthMonitor
from router.policies import POLICIES, CacheAwareConfig, make_policy
from router.proxy import Proxy, ProxyConfig
from router.registry import (
    InvalidWorkerUrl,
    MemoryRegistry,
    RedisRegistry,
    WorkerRecord,
    WorkerRegistry,
    WorkerState,
    normalize_worker_url,
)
from router.workers import WorkerTable
from services.core.arguments import SlimeArgumentParser, add_service_arguments, add_slime_arguments
from services.core.http_app import ApiError, create_app, run_app, wrap_in_app_middleware
from services.core.logging_setup import setup_logging
from services.core.plugins import PluginLoadError, load_class
from services.core.upstream import UpstreamError

logger = logging.getLogger(__name__)

DEFAULT_PORT = 30000
# How often a replica re-reads the registry; also the longest a second replica lags behind the first.
SYNC_INTERVAL_S = 0.25
MIDDLEWARE_FLAG = "--slime-router-middleware-paths"
# The background loops also end on a flag within one tick, so shutdown never waits longer than this.
SHUTDOWN_WAIT_S = 2.0


class WeightVersionBody(BaseModel):
    weight_version: str | int = Field(description="The weight version the trainer has pushed to the engines.")

    @field_validator("weight_version")
    @classmethod
    def _not_blank(cls, value: str | int) -> str:
        text = str(value).strip()
        if not text:
            raise ValueError("must not be empty")
        return text


class Router:
    """The router's parts, built from the parsed flags; ``asgi`` is what uvicorn serves, ``app`` the FastAPI app
    of the router's own endpoints inside it.

    Middlewares loaded from ``--slime-router-middleware-paths`` are built as ``cls(app, router=self)``, slime's
    contract, and may read ``self.args`` (every flag) and the live ``self.table`` of workers.
    """

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.health_config = HealthConfig(
            interval=args.rollout_health_check_interval,
            timeout=args.rollout_health_check_timeout,
            first_wait=args.rollout_health_check_first_wait,
        )
        self.proxy_config = ProxyConfig(
            max_retries=args.max_retries,
            request_timeout=args.request_timeout,
            verdict_wait=args.rollout_health_check_timeout + 1.0,
        )
        self.initial_workers = [_worker_url_flag(url) for url in args.worker_urls or []]
        if args.redis_url:
            self.registry: WorkerRegistry = RedisRegistry(args.redis_url, args.run_id)
        else:
            logger.warning(
                "no --redis-url: the worker registry lives in this process only, so a restart forgets the workers "
                "and a second router replica would not share them"
            )
            self.registry = MemoryRegistry()
        self.table = WorkerTable()
        self.policy = make_policy(
            args.policy,
            CacheAwareConfig(
                cache_threshold=args.cache_threshold,
                balance_abs_threshold=args.balance_abs_threshold,
                balance_rel_threshold=args.balance_rel_threshold,
                max_tree_size=args.max_tree_size,
            ),
        )
        self.monitor = HealthMonitor(self.registry, self.table, self.health_config)
        self.proxy = Proxy(self.table, self.policy, self.monitor, self.proxy_config)
        self.table.on_lost(self.proxy.evict)
        self.table.on_lost(self.policy.forget)
        self.table.on_lost(self.monitor.forget)
        # Bumped by every /abort_request, so that middlewares can tell an abort they must not retry.
        self.abort_epoch = 0
        self._running = False
        self._tasks: list[asyncio.Task] = []
        self.app = self._build_app()
        # What uvicorn serves. Built here, not on the first request, so that a middleware that cannot be
        # constructed (a missing --hf-checkpoint, say) is a start-up error naming its flag.
        self.asgi = self._build_asgi()

    def _build_app(self) -> FastAPI:
        """The FastAPI app of the router's own endpoints (management, /health, /metrics) and its lifespan."""
        app = create_app("router", auth_token=self.args.auth_token, lifespan=self._lifespan)
        self._add_management_routes(app)
        return app

    def _build_asgi(self) -> ASGIApp:
        """The whole router, outermost first: the service middleware (request ids, auth, body limit, request
        metrics), the slime middlewares (the last listed outermost, as slime adds them), then a dispatch that
        sends the app's own paths to FastAPI and every other path straight to the proxy. FastAPI's own layers
        (routing, exception handling, telemetry) cost as much as the proxying, so proxied requests skip them."""
        stack: ASGIApp = _ProxyDispatch(self.app, self.proxy)
        for path in _middleware_paths(self.args.slime_router_middleware_paths):
            cls = load_class(path, flag=MIDDLEWARE_FLAG)
            stack = cls(stack, router=self)
            logger.info("loaded router middleware %s.%s", cls.__module__, cls.__qualname__)
        return wrap_in_app_middleware(self.app, stack)

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        for url in self.initial_workers:
            record, created = await self.registry.add(url)
            logger.info(
                "worker %s from --worker-urls: %s", url, "registered" if created else record.state.value
            )
        self.table.replace_all(await self.registry.snapshot())
        # One probe of each new worker before serving, so that ready engines take traffic from the first request.
        await asyncio.gather(
            *(
                self.monitor.probe_and_apply(url)
                for url, record in self.table.records.items()
                if record.state in (WorkerState.STARTING, WorkerState.RESTARTING)
            )
        )
        self._running = True
        self._tasks = [
            asyncio.create_task(self._sync_loop(), name="registry-sync"),
            asyncio.create_task(self.monitor.run(), name="health-monitor"),
        ]
        try:
            yield
        finally:
            self._running = False
            self.monitor.stop()
            for task in self._tasks:
                task.cancel()
            await asyncio.wait(self._tasks, timeout=SHUTDOWN_WAIT_S)
            await self.monitor.close()
            await self.proxy.close()
            await self.registry.close()

    async def _sync_loop(self) -> None:
        failing = False
        while self._running:
            try:
                await self.monitor.save_errors()
                self.table.replace_all(await self.registry.snapshot())
                if failing:
                    logger.info("registry reachable again")
                failing = False
            except RedisError as exc:
                if not failing:
                    logger.warning("cannot read the worker registry (serving from the last view): %s", exc)
                failing = True
            await asyncio.sleep(SYNC_INTERVAL_S)

    def _add_management_routes(self, app: FastAPI) -> None:
        # Added on the app itself (not an included APIRouter) so that app.routes lists their paths.
        tags: list[str | Enum] = ["router"]
        app.add_api_route("/add_worker", self.add_worker, methods=["POST"], tags=tags)
        app.add_api_route("/remove_worker", self.remove_worker, methods=["POST", "DELETE"], tags=tags)
        app.add_api_route("/list_workers", self.list_workers, methods=["GET"], tags=tags)
        app.add_api_route("/workers", self.workers, methods=["GET"], tags=tags)
        app.add_api_route("/abort_request", self.abort_request, methods=["POST"], tags=tags)
        app.add_api_route("/set_weight_version", self.set_weight_version, methods=["POST"], tags=tags)

    async def add_worker(self, request: Request) -> dict[str, Any]:
        """Register a worker (``?url=`` or JSON ``{"url": ...}``); answers once its first probe is done."""
        url = _worker_url_param(request.query_params.get("url") or request.query_params.get("worker_url"))
        if url is None:
            url = _worker_url_param(_url_from_body(await request.body()))
        if url is None:
            raise ApiError(400, "worker URL is required: POST /add_worker?url=http://host:port", field="url")
        record, created = await self.registry.add(url)
        self.table.put(record)
        if record.state in (WorkerState.STARTING, WorkerState.RESTARTING):
            # One probe right away, so that a ready engine takes traffic as soon as this call returns.
            record = await self.monitor.probe_and_apply(url) or record
        logger.info("worker %s %s: %s", url, "registered" if created else "re-registered", record.state.value)
        return {
            "status": "success",
            "url": url,
            "state": record.state.value,
            "created": created,
            "worker_urls": sorted(self.table.records),
        }

    async def remove_worker(self, request: Request) -> dict[str, Any]:
        url = _worker_url_param(request.query_params.get("url") or request.query_params.get("worker_url"))
        if url is None:
            url = _worker_url_param(_url_from_body(await request.body()))
        if url is None:
            raise ApiError(
                400, "worker URL is required: POST /remove_worker?url=http://host:port", field="url"
            )
        if not await self.registry.remove(url):
            raise ApiError(404, f"no worker {url} is registered (GET /list_workers lists them)", field="url")
        self.table.drop(url)
        return {"status": "success", "url": url, "worker_urls": sorted(self.table.records)}

    async def list_workers(self) -> dict[str, list[str]]:
        snapshot = await self.registry.snapshot()
        return {"urls": [r.url for r in sorted(snapshot.workers.values(), key=lambda r: (r.added_at, r.url))]}

    async def workers(self) -> dict[str, Any]:
        """Every worker with its state, weight version, this replica's load and the error counts."""
        snapshot = await self.registry.snapshot()
        self.table.replace_all(snapshot)
        now = time.time()
        return {
            "weight_version": snapshot.weight_version,
            "policy": self.args.policy,
            "prober": self.monitor.is_leader,
            "workers": [
                self._describe(record, now)
                for record in sorted(snapshot.workers.values(), key=lambda r: (r.added_at, r.url))
            ],
        }

    def _describe(self, record: WorkerRecord, now: float) -> dict[str, Any]:
        return {
            "url": record.url,
            "state": record.state.value,
            "state_since": record.state_since,
            "state_age_s": round(now - record.state_since, 3),
            "routable": record.url in self.table.routable,
            "weight_version": record.weight_version,
            "load": self.table.load.get(record.url, 0),
            "requests": self.table.requests.get(record.url, 0),
            "retries": self.table.retries.get(record.url, 0),
            "errors_total": record.errors_total,
            "consecutive_failures": record.consecutive_failures,
            "last_error": record.last_error,
            "added_at": record.added_at,
            "last_ok_at": record.last_ok_at,
        }

    async def abort_request(self, request: Request) -> dict[str, Any]:
        """Send the abort (e.g. ``{"abort_all": true}`` or ``{"rid": ...}``) to every worker that is up."""
        self.abort_epoch += 1
        body = await request.body()
        targets = [url for url, r in self.table.records.items() if r.state != WorkerState.DEAD]
        results = await asyncio.gather(*(self._abort_one(url, body) for url in targets))
        return {"workers": dict(zip(targets, results, strict=True))}

    async def _abort_one(self, url: str, body: bytes) -> dict[str, Any]:
        try:
            return {"status": await self.monitor.prober.post_json(url, "/abort_request", body or b"{}")}
        except (TimeoutError, UpstreamError) as exc:
            return {"error": f"{type(exc).__name__}: {exc}"}

    async def set_weight_version(self, request: Request) -> dict[str, Any]:
        """The trainer publishes the version it has pushed; workers behind it go STALE until they catch up."""
        try:
            body = WeightVersionBody.model_validate_json(await request.body())
        except ValidationError as exc:
            error = exc.errors()[0]
            field = ".".join(str(part) for part in error["loc"]) or "body"
            raise ApiError(
                422, f'{field}: {error["msg"]} (send {{"weight_version": "N"}})', field=field
            ) from None
        version = str(body.weight_version)
        await self.registry.publish_weight_version(version)
        self.table.set_weight_version(version)
        await self.monitor.refresh_versions()
        return {
            "weight_version": version,
            "workers": {url: record.state.value for url, record in sorted(self.table.records.items())},
        }


class _ProxyDispatch:
    """Sends every HTTP request whose path is not one of the app's own routes to the proxy."""

    def __init__(self, app: FastAPI, proxy: Proxy) -> None:
        self.app = app
        self.proxy = proxy
        self.local_paths = frozenset(path for route in app.routes if (path := getattr(route, "path", None)))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in self.local_paths:
            await self.proxy(scope, receive, send)
        else:
            await self.app(scope, receive, send)


def _worker_url_param(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ApiError(400, f"worker URL must be a string like http://host:port, got {value!r}", field="url")
    try:
        return normalize_worker_url(value)
    except InvalidWorkerUrl as exc:
        raise ApiError(400, str(exc), field="url") from exc


def _url_from_body(body: bytes) -> Any:
    if not body.strip():
        return None
    try:
        payload = json.loads(body)
    except ValueError as exc:
        raise ApiError(400, f"malformed JSON body: {exc}", field="body") from exc
    if not isinstance(payload, dict):
        raise ApiError(400, 'JSON body must be an object like {"url": "http://host:port"}', field="body")
    return payload.get("url", payload.get("worker_url"))


def _worker_url_flag(value: str) -> str:
    try:
        return normalize_worker_url(value)
    except InvalidWorkerUrl as exc:
        raise ValueError(f"--worker-urls: {exc}") from exc


def _middleware_paths(value: str | Sequence[str] | None) -> list[str]:
    # slime's default for the flag is "" (nargs="+"), so both a string and a list arrive here.
    if not value:
        return []
    if isinstance(value, str):
        return [value]
    return [path for path in value if path]


def build_parser() -> argparse.ArgumentParser:
    parser = SlimeArgumentParser(
        prog="slime serve router",
        description="The router: worker registry, load balancing, engine health, retries, middlewares.",
        fromfile_prefix_chars="@",
        allow_abbrev=False,
    )
    add_service_arguments(parser)
    add_slime_arguments(parser, groups=["Rollout", "Fault Tolerance", "Router"])
    group = parser.add_argument_group("Router service")
    group.add_argument(
        "--worker-urls", nargs="*", default=[], help="Workers to register at start (http://host:port)."
    )
    group.add_argument("--policy", choices=POLICIES, default="cache_aware", help="Load-balancing policy.")
    group.add_argument(
        "--workers",
        type=int,
        default=1,
        help="Router processes sharing the port, for more requests/s than one core gives (needs --redis-url).",
    )
    group.add_argument(
        "--max-retries",
        type=int,
        default=3,
        help="Further attempts, each on another worker, for a request whose worker failed before answering.",
    )
    group.add_argument(
        "--request-timeout",
        type=float,
        default=3600.0,
        help="Seconds one attempt may take before it is given up and retried elsewhere "
        "(slime's --sglang-router-request-timeout-secs default).",
    )
    group.add_argument(
        "--cache-threshold",
        type=float,
        default=0.3,
        help="cache_aware: minimum matched fraction of the prompt to follow the cache.",
    )
    group.add_argument(
        "--balance-abs-threshold",
        type=int,
        default=64,
        help="cache_aware: balance load instead when max - min in-flight exceeds this ...",
    )
    group.add_argument(
        "--balance-rel-threshold",
        type=float,
        default=1.5,
        help="... and max exceeds min times this.",
    )
    group.add_argument(
        "--max-tree-size",
        type=int,
        default=1 << 24,
        help="cache_aware: characters of prefix remembered per worker before the least recently used are evicted.",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(None if argv is None else list(argv))
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    if args.workers > 1 and not args.redis_url:
        parser.error(
            "--workers > 1 needs --redis-url: the router processes share the worker registry through Redis"
        )
    setup_logging(args.log_level, service="router")
    try:
        router = Router(args)
    except (ValueError, PluginLoadError) as exc:
        parser.error(str(exc))
    port = args.port or DEFAULT_PORT
    logger.info(
        "router on http://%s:%d, policy %s, registry %s, %d process(es)",
        args.host,
        port,
        args.policy,
        "redis" if args.redis_url else "in-process",
        args.workers,
    )
    if args.workers == 1:
        run_app(router.asgi, args.host, port, log_level=args.log_level)
        return 0
    return _serve_processes(args, port)


def _serve_processes(args: argparse.Namespace, port: int) -> int:
    """``--workers`` router processes accepting on one listening socket, each a replica of the shared registry
    (one of them probes, by the lease). SIGTERM/SIGINT reach every process; a process that dies ends them all,
    so that the orchestrator restarts the router whole."""
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, port))
    sock.set_inheritable(True)
    # Fork, not spawn: the children need the bound socket, and build their own Router (event loop, Redis
    # client, prober identity) after the fork.
    context = multiprocessing.get_context("fork")
    children = [
        context.Process(target=_serve_one, args=(args, sock), name=f"router-{i}") for i in range(args.workers)
    ]
    for child in children:
        child.start()
    stopping = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child.is_alive():
                os.kill(child.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    failed = False
    while alive := [child for child in children if child.is_alive()]:
        # With a timeout: a child may end between the check and the wait, and waiting on nothing blocks forever.
        multiprocessing.connection.wait([child.sentinel for child in alive], timeout=1.0)
        dead = [
            child for child in children if not child.is_alive() and child.exitcode not in (0, -signal.SIGTERM)
        ]
        if dead and not stopping:
            logger.error(
                "router process %s exited with %s; stopping the others", dead[0].name, dead[0].exitcode
            )
            failed = True
            forward(signal.SIGTERM, None)
    sock.close()
    return 1 if failed else 0


def _serve_one(args: argparse.Namespace, sock: socket.socket) -> None:
    router = Router(args)
    config = uvicorn.Config(
        router.asgi,
        log_level=args.log_level.lower(),
        timeout_graceful_shutdown=10.0,
        access_log=False,
    )
    uvicorn.Server(config).run(sockets=[sock])
