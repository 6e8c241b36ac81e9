"""The request path: every path the router does not answer itself is forwarded to a HEALTHY worker chosen by the
policy, the response (streamed or not) passed back as it arrives, and a request whose worker fails before
answering is retried, byte for byte (so with the same ``sampling_seed``), on another worker.

A plain ASGI app over ``services.core.upstream``'s keep-alive pool: Starlette's request and response objects are not
needed to copy bytes, and cost as much as the copying.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from router import metrics
from router.asgi import Receive, Scope, Send, read_body, send_json
from router.health import HealthMonitor
from router.policies import Policy, routing_key
from router.registry import WorkerState
from router.workers import WorkerTable
from services.core.http_app import error_body
from services.core.upstream import (
    BadResponse,
    ConnectFailed,
    ConnectionLost,
    ConnectTimeout,
    UpstreamPool,
)

logger = logging.getLogger(__name__)

# Per-hop headers (RFC 9110 7.6.1) and those the client library sets itself are not copied across the proxy.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
_HOP_BY_HOP_BYTES = frozenset(name.encode() for name in _HOP_BY_HOP)
# The router's own server writes these on every answer; the worker's copies would be duplicates.
_NOT_RETURNED = _HOP_BY_HOP_BYTES | {b"date", b"server"}
# Answers that say "this worker cannot take it now" rather than "this request is wrong": try another worker.
RETRY_STATUSES = frozenset({502, 503, 504})
WORKER_HEADER = b"x-slime-worker"


@dataclass(frozen=True)
class ProxyConfig:
    """``max_retries``: further attempts on other workers after a failed one; ``request_timeout``: seconds an
    attempt may take in all; ``verdict_wait``: how long a request waits, when no worker is HEALTHY but one is
    SUSPECT, for the prober's verdict before it is answered 503."""

    max_retries: int = 3
    request_timeout: float = 3600.0
    connect_timeout: float = 10.0
    verdict_wait: float = 30.0

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError(f"--max-retries must be >= 0, got {self.max_retries}")
        if self.request_timeout <= 0:
            raise ValueError(f"--request-timeout must be positive, got {self.request_timeout}")


class _WorkerLost(Exception):
    """The worker failed after part of its answer had already gone to the client: nothing can be retried."""


class Proxy:
    """Forwards requests to workers; ``evict`` moves a dead worker's in-flight requests to other workers."""

    def __init__(
        self, table: WorkerTable, policy: Policy, monitor: HealthMonitor, config: ProxyConfig
    ) -> None:
        self.table = table
        self.policy = policy
        self.monitor = monitor
        self.config = config
        self.pool = UpstreamPool(connect_timeout=config.connect_timeout)
        self._in_flight: dict[str, set[asyncio.Task]] = {}
        self._evicted: set[asyncio.Task] = set()
        # Per-worker metric children, looked up once: ``labels()`` per request costs more than the proxying.
        self._series: dict[str, tuple[Any, Any, Any]] = {}

    async def close(self) -> None:
        await self.pool.close()

    def evict(self, url: str) -> None:
        """Interrupt every attempt in flight to ``url``; those that have not answered yet are retried."""
        self._series.pop(url, None)
        tasks = self._in_flight.get(url, set())
        if tasks:
            logger.warning("moving %d in-flight request(s) off %s", len(tasks), url)
        for task in list(tasks):
            self._evicted.add(task)
            task.cancel()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        body = await read_body(receive)
        key = routing_key(body) if self.policy.needs_key else None
        raw_path = scope.get("raw_path") or scope["path"].encode()
        target = raw_path.decode("latin-1")
        if scope.get("query_string"):
            target += "?" + scope["query_string"].decode("latin-1")
        headers = [(name, value) for name, value in scope["headers"] if name not in _HOP_BY_HOP_BYTES]
        request_id = scope.get("state", {}).get("request_id")
        if request_id and not any(name == b"x-request-id" for name, _ in headers):
            headers.append((b"x-request-id", request_id.encode("latin-1")))
        tried: list[str] = []
        failures: list[str] = []
        for attempt in range(self.config.max_retries + 1):
            url = await self._choose(key, tried)
            if url is None:
                reason = self.table.why_unroutable()
                if failures:
                    reason = f"{reason}; failed attempts: {'; '.join(failures)}"
                metrics.UNSERVED.labels("no_worker").inc()
                await _reply_unavailable(send, reason, request_id)
                return
            tried.append(url)
            failure = await self._attempt(url, scope["method"], target, headers, body, send)
            if failure is None:
                return
            failures.append(f"{url}: {failure}")
            if attempt < self.config.max_retries:
                self.table.retries[url] += 1
                metrics.RETRIES.labels(url).inc()
                logger.info(
                    "retrying %s %s after %s failed: %s", scope["method"], scope["path"], url, failure
                )
        metrics.UNSERVED.labels("retries_exhausted").inc()
        await _reply_unavailable(
            send,
            f"all {len(tried)} attempts failed ({'; '.join(failures)}); --max-retries is {self.config.max_retries}",
            request_id,
        )

    async def _choose(self, key: str | None, tried: list[str]) -> str | None:
        """A routable worker not tried yet (or any routable one when all were tried); waits for a SUSPECT
        worker's verdict when nothing is routable, for at most ``verdict_wait``; None when nothing can serve."""
        deadline: float | None = None
        while True:
            routable = self.table.routable
            if routable:
                candidates = [url for url in routable if url not in tried] or routable
                return self.policy.select(candidates, self.table.load, key)
            pending = any(record.state == WorkerState.SUSPECT for record in self.table.records.values())
            if not pending:
                return None
            now = time.monotonic()
            deadline = deadline or now + self.config.verdict_wait
            if now >= deadline:
                return None
            await self.table.wait_changed(deadline - now)

    async def _attempt(
        self, url: str, method: str, target: str, headers: list[tuple[bytes, bytes]], body: bytes, send: Send
    ) -> str | None:
        """Send one attempt to ``url`` and stream its answer to the client; None on success, else why it failed
        (before anything reached the client, so that the caller may retry)."""
        task = asyncio.current_task()
        assert task is not None
        in_flight = self._in_flight.setdefault(url, set())
        in_flight.add(task)
        self.table.load[url] += 1
        self.table.requests[url] += 1
        series = self._series.get(url)
        if series is None:
            series = self._series[url] = (
                metrics.REQUESTS.labels(url),
                metrics.IN_FLIGHT.labels(url),
                metrics.LATENCY.labels(url),
            )
        requests, in_flight_gauge, latency = series
        requests.inc()
        in_flight_gauge.inc()
        started = time.perf_counter()
        # Whether the answer has started to go out: from then on a failure cannot be retried.
        replied = False
        try:
            async with asyncio.timeout(self.config.request_timeout):
                response = await self.pool.request(url, method, target, headers, body)
                try:
                    if response.status in RETRY_STATUSES:
                        detail = (await response.read())[:200].decode("utf-8", "replace")
                        metrics.ERRORS.labels(url, "http_5xx").inc()
                        return f"HTTP {response.status} {detail}"
                    out_headers = [
                        (name, value) for name, value in response.headers if name.lower() not in _NOT_RETURNED
                    ]
                    out_headers.append((WORKER_HEADER, url.encode()))
                    start = {"type": "http.response.start", "status": response.status, "headers": out_headers}
                    if response.content_length is not None:
                        content = await response.read()
                        out_headers.append((b"content-length", b"%d" % len(content)))
                        replied = True
                        await send(start)
                        await send({"type": "http.response.body", "body": content})
                        return None
                    # Chunked or server-sent events: every chunk goes out as it arrives.
                    replied = True
                    await send(start)
                    async for chunk in response.chunks():
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    await send({"type": "http.response.body", "body": b""})
                finally:
                    response.release()
            return None
        except asyncio.CancelledError:
            if task not in self._evicted:
                raise
            self._evicted.discard(task)
            task.uncancel()
            metrics.ERRORS.labels(url, "evicted").inc()
            if replied:
                raise _WorkerLost(f"{url} was declared DEAD while streaming its answer") from None
            return "declared DEAD while the request was in flight"
        except TimeoutError:
            limit = self.config.request_timeout
            return self._failed(url, "timeout", f"no answer within --request-timeout {limit:g}s", replied)
        except ConnectTimeout as exc:
            return self._failed(url, "timeout", str(exc), replied)
        except ConnectFailed as exc:
            return self._failed(url, "connect", str(exc), replied, suspect=True)
        except (ConnectionLost, BadResponse) as exc:
            return self._failed(url, "disconnect", str(exc), replied, suspect=True)
        finally:
            in_flight.discard(task)
            self.table.load[url] -= 1
            in_flight_gauge.dec()
            latency.observe(time.perf_counter() - started)

    def _failed(self, url: str, kind: str, message: str, replied: bool, *, suspect: bool = False) -> str:
        self.monitor.report_failure(url, kind, message, suspect=suspect)
        if replied:
            raise _WorkerLost(f"{url} failed after its answer had started: {message}")
        return message


async def _reply_unavailable(send: Send, reason: str, request_id: str | None) -> None:
    await send_json(send, 503, error_body("no_worker", reason, None, request_id), [(b"retry-after", b"1")])
