"""Middlewares loaded by the router tests through --slime-router-middleware-paths, built as cls(app, router=...)."""

from __future__ import annotations

from typing import Any

from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import Response

from router.asgi import ASGIApp, Message, Receive, Scope, Send


class StampMiddleware:
    """Pure ASGI: adds ``x-stamp: <policy>,`` to every answer and counts the requests it saw on the router."""

    def __init__(self, app: ASGIApp, *, router: Any) -> None:
        self.app = app
        self.router = router
        router.stamped = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        self.router.stamped += 1

        async def stamped(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message["headers"], (b"x-stamp", self.router.args.policy.encode())]
            await send(message)

        await self.app(scope, receive, stamped)


class OrderMiddleware(BaseHTTPMiddleware):
    """slime-style (BaseHTTPMiddleware): records, in ``x-order``, whether the stamp was already there."""

    def __init__(self, app: ASGIApp, *, router: Any) -> None:
        super().__init__(app)
        self.router = router

    async def dispatch(self, request: Request, call_next: Any) -> Response:
        response = await call_next(request)
        response.headers["x-order"] = "outer" if "x-stamp" in response.headers else "inner"
        return response
