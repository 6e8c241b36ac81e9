"""What uvicorn serves for the buffer: its hot routes' endpoints called directly, ahead of FastAPI's layers.

FastAPI's middleware, routing and exception layers cost more CPU than ``/buffer/write`` itself. The front calls
the endpoints of a few fixed-path Starlette routes straight away, answers their errors with the app's own
exception handlers, and passes every other request (and the lifespan) to the app. The app's middleware (request
ids, auth, body limit, request metrics) moves outside, around both, so that every request still goes through it.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable

from fastapi import FastAPI
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from services.core.http_app import ASGIApp, Receive, Scope, Send, wrap_in_app_middleware


class _DirectRoutes:
    """Calls the endpoints of ``routes`` for their paths and methods; everything else goes to ``app``."""

    def __init__(self, app: FastAPI, routes: Iterable[Route]):
        self.app = app
        self.routes: dict[str, Route] = {}
        for route in routes:
            if route.param_convertors:
                raise ValueError(f"direct routes have fixed paths, got {route.path!r}")
            if not inspect.iscoroutinefunction(route.endpoint):
                raise ValueError(f"direct routes have async endpoints, {route.path!r} has not")
            self.routes[route.path] = route

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = self.routes.get(scope["path"]) if scope["type"] == "http" else None
        # Another method on the path goes to the app too, which has the route and answers 405.
        if route is None or scope["method"] not in route.methods:
            await self.app(scope, receive, send)
            return
        # What Starlette's routing would have set: request.app for the endpoint, the route for the metrics.
        scope["app"] = self.app
        scope["route"] = route
        request = Request(scope, receive)
        try:
            response = await route.endpoint(request)
        except Exception as exc:
            response = await self._error_response(request, exc)
        await response(scope, receive, send)

    async def _error_response(self, request: Request, exc: Exception) -> Response:
        """The response of the app's handler for ``exc``, chosen as Starlette chooses: a handler for an HTTP
        exception's status code first, else the one for the most specific exception class."""
        handlers = self.app.exception_handlers
        handler = handlers.get(exc.status_code) if isinstance(exc, HTTPException) else None
        if handler is None:
            handler = next((handlers[cls] for cls in type(exc).__mro__ if cls in handlers), None)
        if handler is None:
            raise exc
        response = handler(request, exc)
        return await response if inspect.isawaitable(response) else response


def with_direct_routes(app: FastAPI, routes: Iterable[Route]) -> ASGIApp:
    """``app`` with ``routes`` (plain routes that the app has too) served directly, its middleware outermost.

    Call it once the app's middleware is all added: that middleware is taken off the app to wrap the front.
    """
    return wrap_in_app_middleware(app, _DirectRoutes(app, routes))
