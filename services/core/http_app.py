"""One FastAPI app factory for every service, so that all of them answer health, metrics, auth and errors alike.

The cross-cutting parts (request ids, bearer auth, body-size limit, request metrics) are one pure-ASGI middleware
rather than Starlette's ``BaseHTTPMiddleware``: the router streams SSE through it and must not be buffered.
"""

from __future__ import annotations

import hmac
import itertools
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

REQUEST_ID_HEADER = "x-request-id"


class _RequestIds:
    """Generated request ids: 32 hex digits, a random prefix per process and then a counter, so that a request
    costs no system call (os.urandom per request took 2-3% of the buffer API's CPU under load)."""

    def __init__(self) -> None:
        self._reseed()
        # A forked child would otherwise repeat its parent's ids.
        os.register_at_fork(after_in_child=self._reseed)

    def _reseed(self) -> None:
        self._prefix = os.urandom(8).hex()
        self._numbers = itertools.count()

    def next(self) -> str:
        return f"{self._prefix}{next(self._numbers):016x}"


_request_ids = _RequestIds()

HTTP_REQUESTS = Counter(
    "slime_http_requests_total",
    "HTTP requests answered, by service, method, route template and status code.",
    ["service", "method", "route", "status"],
)
HTTP_LATENCY = Histogram(
    "slime_http_request_duration_seconds",
    "Time from the request's arrival to the start of its response.",
    ["service", "method", "route"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)


class ApiError(Exception):
    """Raised by a handler to answer with ``status`` and a JSON error naming the offending ``field``."""

    def __init__(self, status: int, message: str, *, field: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field
        self.headers = headers


def error_body(kind: str, message: str, field: str | None = None, request_id: str | None = None) -> dict:
    error: dict[str, Any] = {"type": kind, "message": message}
    if field is not None:
        error["field"] = field
    if request_id is not None:
        error["request_id"] = request_id
    return {"error": error}


def _field_of(loc: Iterable[Any]) -> str:
    """Turn pydantic's location tuple into a dotted field name without the ``body``/``query`` prefix."""
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:] or parts
    return ".".join(parts)


def _request_id(request: Request) -> str | None:
    return request.scope.get("state", {}).get("request_id")


async def _on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request", "type": "value_error"}
    field = _field_of(first.get("loc", ("body",)))
    if first.get("type") == "json_invalid":
        message = f"malformed JSON body: {first.get('ctx', {}).get('error', first.get('msg'))}"
        field = "body"
    else:
        message = f"{field}: {first.get('msg')}"
    body = error_body("validation_error", message, field, _request_id(request))
    body["error"]["details"] = [
        {"field": _field_of(e.get("loc", ())), "message": e.get("msg"), "type": e.get("type")} for e in errors
    ]
    return JSONResponse(body, status_code=422)


async def _on_api_error(request: Request, exc: ApiError) -> JSONResponse:
    kind = "client_error" if exc.status < 500 else "server_error"
    return JSONResponse(
        error_body(kind, exc.message, exc.field, _request_id(request)),
        status_code=exc.status,
        headers=exc.headers,
    )


async def _on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    kind = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(
        exc.status_code, "http_error"
    )
    return JSONResponse(
        error_body(kind, detail, getattr(exc, "field", None), _request_id(request)),
        status_code=exc.status_code,
        headers=getattr(exc, "headers", None),
    )


async def _on_unhandled(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return JSONResponse(
        error_body("internal_error", f"{type(exc).__name__}: {exc}", None, _request_id(request)),
        status_code=500,
    )


class ServiceMiddleware:
    """Request ids, bearer auth, body-size limit and request metrics for one service, in pure ASGI."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        service: str,
        auth_token: str | None,
        max_body_bytes: int,
        public_paths: Iterable[str],
    ):
        self.app = app
        self.service = service
        self.auth_token = auth_token.encode() if auth_token else None
        self.max_body_bytes = max_body_bytes
        self.public_paths = frozenset(public_paths)
        # Metric children by labels: labels() takes a lock and builds a key on every call.
        self._latency: dict[tuple[str, str], Any] = {}
        self._requests: dict[tuple[str, str, int], Any] = {}

    def _record(self, method: str, route: str, status: int, seconds: float) -> None:
        latency = self._latency.get((method, route))
        if latency is None:
            latency = self._latency[method, route] = HTTP_LATENCY.labels(self.service, method, route)
        latency.observe(seconds)
        requests = self._requests.get((method, route, status))
        if requests is None:
            requests = self._requests[method, route, status] = HTTP_REQUESTS.labels(
                self.service, method, route, str(status)
            )
        requests.inc()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        request_id = headers.get(REQUEST_ID_HEADER) or _request_ids.next()
        scope.setdefault("state", {})["request_id"] = request_id
        start = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [
                    *message.get("headers", ()),
                    (b"x-request-id", request_id.encode("latin-1")),
                ]
                route = getattr(scope.get("route"), "path", None) or "unmatched"
                self._record(scope["method"], route, message["status"], time.perf_counter() - start)
            await send(message)

        rejection = self._reject(scope, headers, request_id)
        if rejection is not None:
            await rejection(scope, receive, send_wrapper)
            return
        await self.app(scope, self._limited(receive), send_wrapper)

    def _reject(self, scope: Scope, headers: dict[str, str], request_id: str) -> JSONResponse | None:
        if self.auth_token is not None and scope["path"] not in self.public_paths:
            auth = headers.get("authorization", "")
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.auth_token):
                message = "missing bearer token" if not auth else "invalid bearer token"
                return JSONResponse(
                    error_body(
                        "unauthorized", f"{message}: send 'Authorization: Bearer <token>'", None, request_id
                    ),
                    status_code=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                return JSONResponse(
                    error_body("bad_request", "Content-Length is not a number", "Content-Length", request_id),
                    status_code=400,
                )
            if int(length) > self.max_body_bytes:
                return self._too_large(request_id)
        return None

    def _too_large(self, request_id: str) -> JSONResponse:
        return JSONResponse(
            error_body(
                "payload_too_large",
                f"request body exceeds the limit of {self.max_body_bytes} bytes",
                "body",
                request_id,
            ),
            status_code=413,
        )

    def _limited(self, receive: Receive) -> Receive:
        """Count body bytes as they arrive, so a chunked upload without Content-Length is limited too."""
        received = 0
        limit = self.max_body_bytes

        async def wrapped() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise PayloadTooLarge(limit)
            return message

        return wrapped


class PayloadTooLarge(HTTPException):
    """Raised while the body streams in; an HTTPException so FastAPI's body parsing passes it through unchanged."""

    field = "body"

    def __init__(self, limit: int):
        super().__init__(413, f"request body exceeds the limit of {limit} bytes")


def create_app(
    service: str,
    *,
    auth_token: str | None = None,
    max_body_bytes: int = 64 << 20,
    lifespan: Any = None,
    public_paths: Iterable[str] = ("/health", "/metrics"),
    title: str | None = None,
) -> FastAPI:
    """Build the FastAPI app a service adds its routers to: health, metrics, request ids, auth, errors, body limit."""
    app = FastAPI(title=title or f"slime {service}", lifespan=lifespan)
    app.state.service = service
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(ApiError, _on_api_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(Exception, _on_unhandled)

    @app.get("/health", tags=["ops"])
    async def health() -> dict:
        return {"status": "ok", "service": service}

    @app.get("/metrics", tags=["ops"])
    async def metrics() -> Response:
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(
        ServiceMiddleware,
        service=service,
        auth_token=auth_token,
        max_body_bytes=max_body_bytes,
        public_paths=public_paths,
    )
    return app


def wrap_in_app_middleware(app: FastAPI, inner: ASGIApp) -> ASGIApp:
    """``inner`` inside the middleware added to ``app`` (``create_app``'s ``ServiceMiddleware`` and any the service
    added, outermost first as the app would apply it), which is taken off ``app``: for a front that sends some
    requests past FastAPI's own layers while every request still goes through that middleware. Call it once the
    app's middleware is all added and before the app serves."""
    for middleware in reversed(app.user_middleware):
        inner = middleware.cls(inner, *middleware.args, **middleware.kwargs)
    app.user_middleware.clear()
    return inner


def run_app(
    app: ASGIApp,
    host: str,
    port: int,
    *,
    log_level: str = "info",
    graceful_shutdown_s: float = 10.0,
    limit_concurrency: int | None = None,
) -> None:
    """Serve ``app`` with uvicorn until SIGINT/SIGTERM, letting in-flight requests finish first."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level.lower(),
        timeout_graceful_shutdown=graceful_shutdown_s,
        limit_concurrency=limit_concurrency,
        access_log=False,
    )
    uvicorn.Server(config).run()
