"""SGLang backend: run ``sglang.launch_server`` as a child process, wait for it to be healthy, restart it when it
dies, and serve its whole HTTP surface through this process's port (so the router sees one stable address).

The same supervision can run the built-in engine as the child (``--supervised-child builtin``): crash isolation
for CPU engines, and the way the supervision is exercised where SGLang cannot run.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import httpx
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from starlette.background import BackgroundTask

from services.core.http_app import ApiError
from services.core.net import free_port
from services.core.supervisor import ServiceProcess

logger = logging.getLogger(__name__)

CHILD_RESTARTS = Counter(
    "slime_rollout_engine_child_restarts_total", "Restarts of the supervised engine process after it died."
)
CHILD_UP = Gauge("slime_rollout_engine_child_up", "1 while the supervised engine process serves requests.")

# Hop-by-hop headers and those httpx / Starlette recompute for the forwarded message.
_DROPPED_HEADERS = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "keep-alive", "upgrade", "te", "trailer"}
)


def _flag(name: str, value: Any) -> list[str]:
    flag = "--" + name.replace("_", "-")
    if value is True:
        return [flag]
    if value is False or value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [flag, *map(str, value)]
    return [flag, str(value)]


def sglang_argv(args: Any, port: int) -> list[str]:
    """``python -m sglang.launch_server`` with slime's managed settings and every ``--sglang-*`` pass-through."""
    argv = [
        sys.executable,
        "-m",
        "sglang.launch_server",
        "--model-path",
        args.hf_checkpoint,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--tp-size",
        str(args.rollout_num_gpus_per_engine),
        "--random-seed",
        str(args.rollout_seed),
        "--trust-remote-code",
        "--skip-server-warmup",
    ]
    if args.offload or args.colocate:
        argv.append("--enable-memory-saver")
    for name, value in sorted(args.sglang_passthrough.items()):
        argv.extend(_flag(name, value))
    return argv


def builtin_child_argv(args: Any, port: int) -> list[str]:
    """The built-in engine as a child, with the same model, pass-through flags and engine settings."""
    argv = [
        sys.executable,
        "-m",
        "services.rollout_engine.server",
        "--engine-backend",
        "builtin",
        "--hf-checkpoint",
        args.hf_checkpoint,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--rollout-seed",
        str(args.rollout_seed),
        "--engine-device",
        args.engine_device,
        "--engine-dtype",
        args.engine_dtype,
        "--log-level",
        args.log_level,
    ]
    if args.num_threads is not None:
        argv += ["--num-threads", str(args.num_threads)]
    if args.kv_cache_memory_gb is not None:
        argv += ["--kv-cache-memory-gb", str(args.kv_cache_memory_gb)]
    if args.rollout_max_context_len is not None:
        argv += ["--rollout-max-context-len", str(args.rollout_max_context_len)]
    for name, value in sorted(args.sglang_passthrough.items()):
        argv.extend(_flag(f"sglang_{name}", value))
    return argv


class EngineSupervisor:
    """Keeps one engine child alive on a fixed loopback port; restarts it with exponential backoff."""

    def __init__(
        self,
        build_argv: Callable[[int], list[str]],
        *,
        log_path: Path | None = None,
        health_timeout_s: float = 600.0,
        poll_s: float = 0.5,
        max_backoff_s: float = 30.0,
    ):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.process = ServiceProcess(
            "rollout-engine-child",
            build_argv(self.port),
            health_url=f"{self.base_url}/health_generate",
            log_path=log_path,
        )
        self.health_timeout_s = health_timeout_s
        self.poll_s = poll_s
        self.max_backoff_s = max_backoff_s
        self.ready = False
        self.restarts = 0
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="engine-supervisor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.ready = False
        CHILD_UP.set(0)
        self.process.stop()

    def status(self) -> dict[str, Any]:
        return {
            "child_url": self.base_url,
            "child_pid": self.process.pid if self.process.alive() else None,
            "ready": self.ready,
            "restarts": self.restarts,
            "last_error": self.last_error,
            "command": self.process.argv,
        }

    def _launch(self) -> bool:
        try:
            self.process.start()
            self.process.wait_healthy(self.health_timeout_s)
        except (RuntimeError, TimeoutError) as exc:
            self.last_error = str(exc)
            logger.error("engine child failed to become healthy: %s", exc)
            self.process.stop()
            return False
        self.ready = True
        CHILD_UP.set(1)
        logger.info("engine child pid %s healthy at %s", self.process.pid, self.base_url)
        return True

    def _watch(self) -> None:
        backoff = 1.0
        first = True
        while not self._stop.is_set():
            if not self.process.alive():
                self.ready = False
                CHILD_UP.set(0)
                if not first:
                    self.restarts += 1
                    CHILD_RESTARTS.inc()
                    logger.warning("engine child exited (code %s); restarting", self.process.popen.returncode)
                first = False
                if self._launch():
                    backoff = 1.0
                else:
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, self.max_backoff_s)
                continue
            self._stop.wait(self.poll_s)


def _filtered(headers: Iterable[tuple[str, str]]) -> dict[str, str]:
    return {k: v for k, v in headers if k.lower() not in _DROPPED_HEADERS}


def install(app: FastAPI, supervisor: EngineSupervisor) -> None:
    """Add the supervisor's status, merged metrics and the catch-all proxy to ``app``."""
    client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=5.0), trust_env=False)
    app.state.supervisor = supervisor
    app.state.proxy_client = client
    # The child's metrics join ours on /metrics (families we export ourselves are not repeated).
    app.router.routes[:] = [r for r in app.router.routes if getattr(r, "path", None) != "/metrics"]
    router = APIRouter()

    @router.get("/supervisor/status")
    async def supervisor_status() -> dict[str, Any]:
        return supervisor.status()

    @router.get("/metrics")
    async def merged_metrics() -> Response:
        own = generate_latest(REGISTRY)
        child = b""
        if supervisor.ready:
            try:
                answer = await client.get(f"{supervisor.base_url}/metrics", timeout=5.0)
                if answer.status_code == 200:
                    child = _foreign_families(answer.text)
            except httpx.HTTPError as exc:
                logger.debug("child metrics unavailable: %s", exc)
        return Response(own + child, media_type="text/plain; version=0.0.4; charset=utf-8")

    @router.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
    async def proxy(path: str, request: Request) -> Response:
        if not supervisor.ready:
            raise ApiError(
                503, "the supervised engine is starting or restarting", headers={"Retry-After": "1"}
            )
        upstream = client.build_request(
            request.method,
            f"{supervisor.base_url}/{path}",
            params=request.query_params,
            headers=_filtered(request.headers.items()),
            content=request.stream(),
        )
        try:
            answer = await client.send(upstream, stream=True)
        except httpx.HTTPError as exc:
            raise ApiError(502, f"the supervised engine did not answer: {type(exc).__name__}: {exc}") from exc
        return StreamingResponse(
            answer.aiter_raw(),
            status_code=answer.status_code,
            headers=_filtered(answer.headers.items()),
            background=BackgroundTask(answer.aclose),
        )

    app.include_router(router)


def _foreign_families(text: str) -> bytes:
    """Re-expose the child's metric families that this process does not export itself."""
    ours = {family.name for family in REGISTRY.collect()}
    families = [f for f in text_string_to_metric_families(text) if f.name not in ours]

    class _Snapshot:
        def collect(self) -> Any:
            return iter(families)

    registry = CollectorRegistry()
    registry.register(_Snapshot())
    return generate_latest(registry)
