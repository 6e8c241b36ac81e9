"""The shared app factory, served by a real uvicorn on loopback: health, metrics, auth, errors and body limits."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel, Field

from services.core.http_app import ApiError, create_app


class Item(BaseModel):
    name: str
    count: int = Field(ge=0)


def _build_app(token: str | None):
    app = create_app("testsvc", auth_token=token, max_body_bytes=1024)

    @app.post("/items")
    async def add_item(item: Item) -> dict:
        if item.name == "taken":
            raise ApiError(409, "an item named 'taken' exists", field="name")
        return {"stored": item.name}

    @app.get("/boom")
    async def boom() -> dict:
        raise RuntimeError("kaput")

    return app


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Served:
    def __init__(self, token: str | None):
        self.port = _free_port()
        config = uvicorn.Config(_build_app(token), host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline:
                raise TimeoutError("uvicorn did not start")
            time.sleep(0.02)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def open_url() -> Iterator[str]:
    with _Served(None) as url:
        yield url


@pytest.fixture(scope="module")
def locked_url() -> Iterator[str]:
    with _Served("s3cret") as url:
        yield url


def test_health_names_the_service(open_url: str) -> None:
    r = httpx.get(f"{open_url}/health")
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "service": "testsvc"}


def test_metrics_parse_and_count_requests(open_url: str) -> None:
    httpx.post(f"{open_url}/items", json={"name": "a", "count": 1})
    text = httpx.get(f"{open_url}/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = families["slime_http_requests"].samples
    assert any(
        s.labels.get("route") == "/items" and s.labels.get("status") == "200" and s.value >= 1
        for s in samples
    )
    assert "slime_http_request_duration_seconds" in families


def test_request_id_is_echoed_or_generated(open_url: str) -> None:
    r = httpx.get(f"{open_url}/health", headers={"X-Request-ID": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    generated = httpx.get(f"{open_url}/health").headers["x-request-id"]
    assert len(generated) == 32


def test_wrong_type_gives_422_naming_the_field(open_url: str) -> None:
    r = httpx.post(f"{open_url}/items", json={"name": "a", "count": "many"})
    assert r.status_code == 422
    error = r.json()["error"]
    assert error["field"] == "count"
    assert "count" in error["message"]


def test_missing_field_is_named(open_url: str) -> None:
    r = httpx.post(f"{open_url}/items", json={"count": 1})
    assert r.status_code == 422
    assert r.json()["error"]["field"] == "name"


def test_malformed_json_gives_422_naming_the_body(open_url: str) -> None:
    r = httpx.post(
        f"{open_url}/items", content=b'{"name": "a", ', headers={"content-type": "application/json"}
    )
    assert r.status_code == 422
    error = r.json()["error"]
    assert error["field"] == "body"
    assert "malformed JSON" in error["message"]


def test_api_error_keeps_status_and_field(open_url: str) -> None:
    r = httpx.post(f"{open_url}/items", json={"name": "taken", "count": 1})
    assert r.status_code == 409
    assert r.json()["error"] == {
        "type": "client_error",
        "message": "an item named 'taken' exists",
        "field": "name",
        "request_id": r.headers["x-request-id"],
    }


def test_unhandled_error_is_a_json_500(open_url: str) -> None:
    r = httpx.get(f"{open_url}/boom")
    assert r.status_code == 500
    assert "kaput" in r.json()["error"]["message"]


def test_unknown_path_is_a_json_404(open_url: str) -> None:
    r = httpx.get(f"{open_url}/nope")
    assert r.status_code == 404
    assert r.json()["error"]["type"] == "not_found"


def test_oversized_body_with_length_gives_413(open_url: str) -> None:
    r = httpx.post(f"{open_url}/items", json={"name": "x" * 2000, "count": 1})
    assert r.status_code == 413
    assert r.json()["error"]["field"] == "body"


def test_oversized_chunked_body_gives_413(open_url: str) -> None:
    def chunks():
        for _ in range(10):
            yield b"x" * 500

    r = httpx.post(f"{open_url}/items", content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in r.request.headers
    assert r.status_code == 413


def test_auth_rejects_missing_and_wrong_tokens(locked_url: str) -> None:
    r = httpx.post(f"{locked_url}/items", json={"name": "a", "count": 1})
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"
    r = httpx.post(
        f"{locked_url}/items", json={"name": "a", "count": 1}, headers={"Authorization": "Bearer nope"}
    )
    assert r.status_code == 401
    assert "invalid" in r.json()["error"]["message"]


def test_auth_accepts_the_token_and_leaves_health_public(locked_url: str) -> None:
    ok = httpx.post(
        f"{locked_url}/items", json={"name": "a", "count": 1}, headers={"Authorization": "Bearer s3cret"}
    )
    assert ok.status_code == 200
    assert ok.json() == {"stored": "a"}
    assert httpx.get(f"{locked_url}/health").status_code == 200
    assert httpx.get(f"{locked_url}/metrics").status_code == 200
