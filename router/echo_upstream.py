"""EchoUpstream: a trivially fast stand-in for an SGLang engine, used by the router's tests and its overhead
benchmark. It speaks the engine endpoints the router touches (``/generate`` with streaming, ``/health_generate``,
``/get_weight_version``, ``/update_weight_version``, ``/abort_request``) and "generates" by echoing the prompt,
one character per token, so answers are checkable and identical on every upstream.

Run it as ``python -m router.echo_upstream --port N``; ``POST /control`` changes its behaviour mid-test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import uuid
from collections.abc import Sequence
from typing import Any

import uvicorn

from router.asgi import Receive, Scope, Send, read_body, send_json

logger = logging.getLogger(__name__)


class EchoUpstream:
    """The ASGI app. ``latency``: seconds added to every /generate; ``token_latency``: seconds per generated
    token (between stream chunks). ``POST /control`` changes these and how /health_generate answers."""

    def __init__(
        self,
        *,
        name: str = "echo",
        weight_version: str = "0",
        latency: float = 0.0,
        token_latency: float = 0.0,
    ) -> None:
        self.name = name
        self.weight_version = weight_version
        self.latency = latency
        self.token_latency = token_latency
        # "ok", "fail" (503) or "hang" (never answers): what /health_generate does.
        self.health = "ok"
        self.requests = 0
        self.aborted = 0
        self._in_flight: dict[str, asyncio.Event] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        body = await read_body(receive)
        path = scope["path"]
        if path == "/generate":
            await self._generate(body, send)
        elif path == "/health_generate":
            await self._health_generate(send)
        elif path in ("/health", "/flush_cache"):
            await send_json(send, 200, {})
        elif path == "/get_weight_version":
            await send_json(send, 200, {"weight_version": self.weight_version})
        elif path == "/update_weight_version":
            await self._update_weight_version(body, send)
        elif path == "/abort_request":
            await self._abort(body, send)
        elif path in ("/get_server_info", "/get_model_info"):
            await send_json(send, 200, {"model_path": f"echo/{self.name}", "is_generation": True})
        elif path == "/stats":
            stats = {"name": self.name, "requests": self.requests, "aborted": self.aborted}
            await send_json(send, 200, {**stats, "in_flight": len(self._in_flight)})
        elif path == "/control":
            await self._control(body, send)
        else:
            await send_json(send, 404, {"error": {"message": f"EchoUpstream has no {path}"}})

    async def _generate(self, body: bytes, send: Send) -> None:
        try:
            request = json.loads(body)
            prompt = _prompt_of(request)
        except (ValueError, TypeError) as exc:
            await send_json(send, 400, {"error": {"message": f"bad /generate request: {exc}"}})
            return
        self.requests += 1
        params = request.get("sampling_params") or {}
        max_new = int(params.get("max_new_tokens", 16))
        output = prompt[:max_new]
        rid = str(request.get("rid") or uuid.uuid4().hex)
        aborted = self._in_flight[rid] = asyncio.Event()
        try:
            if self.latency:
                await _sleep_unless(aborted, self.latency)
            if request.get("stream"):
                await self._stream(request, prompt, output, rid, aborted, send)
                return
            if self.token_latency:
                await _sleep_unless(aborted, self.token_latency * len(output))
            if aborted.is_set():
                output = ""
            await send_json(send, 200, self._answer(request, prompt, output, rid, aborted.is_set(), max_new))
        finally:
            del self._in_flight[rid]

    async def _stream(
        self, request: dict, prompt: str, output: str, rid: str, aborted: asyncio.Event, send: Send
    ) -> None:
        max_new = int((request.get("sampling_params") or {}).get("max_new_tokens", 16))
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")],
            }
        )
        for end in range(1, len(output) + 1):
            if aborted.is_set():
                break
            chunk = self._answer(request, prompt, output[:end], rid, False, max_new, final=end == len(output))
            await send(
                {"type": "http.response.body", "body": b"data: " + _dumps(chunk) + b"\n\n", "more_body": True}
            )
            if self.token_latency:
                await _sleep_unless(aborted, self.token_latency)
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})

    def _answer(
        self,
        request: dict,
        prompt: str,
        output: str,
        rid: str,
        aborted: bool,
        max_new: int,
        final: bool = True,
    ) -> dict:
        ids = [ord(char) for char in output]
        if aborted:
            finish: dict | None = {"type": "abort", "message": "aborted"}
        elif not final:
            finish = None
        elif len(output) >= max_new:
            finish = {"type": "length", "length": max_new}
        else:
            finish = {"type": "stop", "matched": None}
        meta: dict[str, Any] = {
            "id": rid,
            "finish_reason": finish,
            "prompt_tokens": len(prompt),
            "completion_tokens": len(ids),
            "weight_version": self.weight_version,
        }
        if request.get("return_logprob"):
            meta["output_token_logprobs"] = [[0.0, token, None] for token in ids]
        return {"text": output, "output_ids": ids, "meta_info": meta}

    async def _health_generate(self, send: Send) -> None:
        if self.health == "hang":
            await asyncio.Event().wait()
        if self.health == "fail":
            await send_json(send, 503, {"error": {"message": "not ready"}})
            return
        await send_json(send, 200, {})

    async def _update_weight_version(self, body: bytes, send: Send) -> None:
        request = json.loads(body or b"{}")
        self.weight_version = str(request["new_version"])
        if request.get("abort_all_requests"):
            self._abort_all()
        await send_json(
            send, 200, {"success": True, "message": f"weight version set to {self.weight_version}"}
        )

    async def _abort(self, body: bytes, send: Send) -> None:
        request = json.loads(body or b"{}")
        if request.get("abort_all"):
            self._abort_all()
        elif request.get("rid") in self._in_flight:
            self.aborted += 1
            self._in_flight[request["rid"]].set()
        await send_json(send, 200, {})

    def _abort_all(self) -> None:
        self.aborted += len(self._in_flight)
        for event in self._in_flight.values():
            event.set()

    async def _control(self, body: bytes, send: Send) -> None:
        request = json.loads(body or b"{}")
        if "health" in request:
            if request["health"] not in ("ok", "fail", "hang"):
                await send_json(send, 400, {"error": {"message": "health must be ok, fail or hang"}})
                return
            self.health = request["health"]
        for name in ("latency", "token_latency"):
            if name in request:
                setattr(self, name, float(request[name]))
        await send_json(
            send, 200, {"health": self.health, "latency": self.latency, "token_latency": self.token_latency}
        )


def _prompt_of(request: Any) -> str:
    if not isinstance(request, dict):
        raise TypeError("the body must be a JSON object")
    text = request.get("text")
    if isinstance(text, list):
        text = text[0] if text else ""
    if isinstance(text, str):
        return text
    ids = request.get("input_ids")
    if isinstance(ids, list) and ids and isinstance(ids[0], list):
        ids = ids[0]
    if isinstance(ids, list):
        return "".join(chr(int(token)) for token in ids)
    raise TypeError("one of text or input_ids is required")


async def _sleep_unless(event: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(event.wait(), seconds)
    except TimeoutError:
        return


def _dumps(payload: Any) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode()


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m router.echo_upstream", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", default=None, help="Name reported by /stats (default: echo-<port>).")
    parser.add_argument("--weight-version", default="0")
    parser.add_argument("--latency", type=float, default=0.0, help="Seconds added to every /generate.")
    parser.add_argument("--token-latency", type=float, default=0.0, help="Seconds per generated token.")
    args = parser.parse_args(argv)
    app = EchoUpstream(
        name=args.name or f"echo-{args.port}",
        weight_version=args.weight_version,
        latency=args.latency,
        token_latency=args.token_latency,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
