"""The buffer's front: ``/buffer/write`` served ahead of FastAPI keeps the app's request ids, request metrics, body
limit and error answers."""

from __future__ import annotations

import pytest
import redis
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families
from starlette.responses import Response
from starlette.routing import Route

from rollout_buffer.asgi_front import with_direct_routes
from services.core.embedded_redis import EmbeddedRedis
from tests.rollout_buffer.helpers import ServedBuffer, trajectory


def _metric(buffer: ServedBuffer, name: str, **labels: str) -> float:
    text = buffer.http.get("/metrics").text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


def _requests(buffer: ServedBuffer, status: str) -> float:
    return _metric(
        buffer,
        "slime_http_requests_total",
        service="rollout-buffer",
        method="POST",
        route="/buffer/write",
        status=status,
    )


def test_writes_keep_request_ids_and_are_counted_by_route_and_status(buffer: ServedBuffer) -> None:
    # The metrics are the process's: other tests' requests count too, so compare before and after.
    latency = "slime_http_request_duration_seconds_count"
    before = (
        _requests(buffer, "200"),
        _requests(buffer, "422"),
        _metric(buffer, latency, method="POST", route="/buffer/write"),
    )
    ok = buffer.http.post("/buffer/write", json=trajectory("u1", "g"), headers={"X-Request-ID": "w-1"})
    assert ok.status_code == 200 and ok.headers["x-request-id"] == "w-1"

    bad = buffer.http.post("/buffer/write", json={**trajectory("u2", "g"), "reward": "high"})
    assert bad.status_code == 422
    error = bad.json()["error"]
    assert error["field"] == "reward" and "reward" in error["message"]
    assert error["request_id"] == bad.headers["x-request-id"] and len(error["request_id"]) == 32

    after = (
        _requests(buffer, "200"),
        _requests(buffer, "422"),
        _metric(buffer, latency, method="POST", route="/buffer/write"),
    )
    assert [a - b for a, b in zip(after, before, strict=True)] == [1, 1, 2]


def test_other_methods_on_the_write_path_get_the_apps_405(buffer: ServedBuffer) -> None:
    response = buffer.http.get("/buffer/write")
    assert response.status_code == 405
    assert response.json()["error"]["type"] == "method_not_allowed"
    assert response.headers["x-request-id"]


def test_a_chunked_body_over_the_limit_is_refused_with_413(buffer: ServedBuffer) -> None:
    refused_before = _metric(buffer, "slime_rollout_buffer_rejected_total", reason="too_large")
    # No Content-Length: the limit applies while the body streams in (the limit here is 64 KiB).
    chunks = (b" " * 4096 for _ in range(20))
    response = buffer.http.post("/buffer/write", content=chunks, headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert response.json()["error"]["field"] == "body"
    assert _metric(buffer, "slime_rollout_buffer_rejected_total", reason="too_large") == refused_before + 1


def test_a_write_that_redis_refuses_is_a_503_and_stores_nothing(
    buffer: ServedBuffer, redis_server: EmbeddedRedis
) -> None:
    item = trajectory("u1", "g")
    with redis.Redis.from_url(redis_server.url) as admin:
        admin.config_set("maxmemory", 1)
        try:
            refused = buffer.http.post("/buffer/write", json=item)
        finally:
            admin.config_set("maxmemory", 0)
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "1"
    error = refused.json()["error"]
    assert error["type"] == "store_unavailable" and "nothing was stored" in error["message"]
    assert error["request_id"] == refused.headers["x-request-id"]

    stored = buffer.http.post("/buffer/write", json=item).json()
    assert stored["message"] == "Data has been successfully written to buffer"


def test_direct_routes_must_have_fixed_paths_and_async_endpoints() -> None:
    async def endpoint(request) -> Response:
        return Response()

    def blocking_endpoint(request) -> Response:
        return Response()

    with pytest.raises(ValueError, match=r"fixed paths, got '/items/\{item_id\}'"):
        with_direct_routes(FastAPI(), [Route("/items/{item_id}", endpoint, methods=["POST"])])
    with pytest.raises(ValueError, match="async endpoints, '/items' has not"):
        with_direct_routes(FastAPI(), [Route("/items", blocking_endpoint, methods=["POST"])])
