"""Prometheus metrics of the router, per worker: traffic, errors, retries, in-flight, latency and health state."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from router.registry import WorkerState

# Why an attempt or a probe failed: no connection, no answer in time, the connection dropped mid-answer, the
# worker answered a gateway error (502/503/504), it was evicted (declared dead) mid-request, or a health probe failed.
ERROR_KINDS = ("connect", "timeout", "disconnect", "http_5xx", "evicted", "probe")

REQUESTS = Counter("slime_router_requests_total", "Requests sent to a worker (each attempt).", ["worker"])
ERRORS = Counter(
    "slime_router_errors_total",
    "Failed attempts and probes, by worker and kind (one of ERROR_KINDS).",
    ["worker", "kind"],
)
RETRIES = Counter(
    "slime_router_retries_total",
    "Requests retried on another worker after this worker failed them.",
    ["worker"],
)
IN_FLIGHT = Gauge("slime_router_in_flight", "Requests in flight to a worker from this replica.", ["worker"])
LATENCY = Histogram(
    "slime_router_request_duration_seconds",
    "Time from sending an attempt to a worker to the end of its response.",
    ["worker"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
)
WORKER_STATE = Gauge(
    "slime_router_worker_state",
    "1 for the worker's current health state, 0 for the others.",
    ["worker", "state"],
)
UNSERVED = Counter(
    "slime_router_unserved_total",
    "Requests answered 503 because no worker could serve them, by reason.",
    ["reason"],
)


def set_state(url: str, state: WorkerState | None) -> None:
    """Publish ``state`` as the worker's current one; None removes the worker's series."""
    for candidate in WorkerState:
        if state is None:
            try:
                WORKER_STATE.remove(url, candidate.value)
            except KeyError:
                continue
        else:
            WORKER_STATE.labels(url, candidate.value).set(1.0 if candidate == state else 0.0)


def forget_worker(url: str) -> None:
    """Drop a removed worker's per-worker series so that /metrics does not list it forever."""
    set_state(url, None)
    for metric in (REQUESTS, RETRIES, IN_FLIGHT, LATENCY):
        try:
            metric.remove(url)
        except KeyError:
            continue
    for kind in ERROR_KINDS:
        try:
            ERRORS.remove(url, kind)
        except KeyError:
            continue
