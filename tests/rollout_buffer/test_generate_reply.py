"""How a rollout worker reads the router's ``/generate`` reply: a real HTTP server on loopback answering with the
bytes an engine may send, including the non-standard ``-Infinity`` / ``NaN`` Python's json writes for log-probs."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
from fastapi import FastAPI
from fastapi.responses import Response

from rollout_buffer.generate import RouterError, _post_generate, close_clients
from tests.reward_model.conftest import serve_app


def _router(body: bytes, status: int = 200) -> FastAPI:
    app = FastAPI()

    @app.post("/generate")
    async def generate() -> Response:
        return Response(body, status_code=status, media_type="application/json")

    return app


async def test_a_reply_with_infinite_log_probs_is_read_as_python_reads_it() -> None:
    body = b'{"text": "4", "meta_info": {"output_token_logprobs": [[-Infinity, 7, null], [NaN, 8, null]]}}'
    args = SimpleNamespace(sglang_router_request_timeout_secs=10)
    async with serve_app(_router(body)) as url:
        try:
            reply = await _post_generate(args, url, {"input_ids": [1, 2]})
        finally:
            await close_clients()
    first, second = reply["meta_info"]["output_token_logprobs"]
    assert first[0] == -math.inf and first[1] == 7
    assert math.isnan(second[0]) and second[1] == 8


async def test_a_plain_reply_and_an_error_status() -> None:
    args = SimpleNamespace(sglang_router_request_timeout_secs=10)
    async with serve_app(_router(b'[{"text": "ok", "meta_info": {}}]')) as url:
        try:
            assert await _post_generate(args, url, {"input_ids": [[1], [2]]}) == [
                {"text": "ok", "meta_info": {}}
            ]
        finally:
            await close_clients()
    async with serve_app(_router(b'{"error": "no engine"}', status=503)) as url:
        try:
            with pytest.raises(RouterError, match="answered 503.*no engine"):
                await _post_generate(args, url, {"input_ids": [1]})
        finally:
            await close_clients()
