"""A lean HTTP/1.1 client for service-to-service calls (the router to its workers, rollout workers to the
router): keep-alive connections per origin, responses parsed by httptools (uvicorn's parser) and handed over as
they arrive, so that a stream reaches the client chunk by chunk.

A general client (aiohttp, httpx) spends most of the router's CPU on a request it only relays: on the loopback
benchmark this one costs about a third of aiohttp's CPU per request, and a fifth of httpx's. Errors say what
happened to the connection, because the router treats "nobody listens" differently from "no answer in time".
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

import httptools

# Idle connections older than this are not reused: uvicorn (SGLang's server) closes them after 5 s.
KEEPALIVE_S = 4.0
# A reused connection lost sooner than this after sending was stale (closed by the worker while idle).
STALE_REUSE_S = 0.5
# A streamed body buffered beyond this (the client reads slower than the worker writes) pauses reading.
HIGH_WATER = 1 << 20


class UpstreamError(Exception):
    """A request to a worker failed before its answer was complete."""


class ConnectFailed(UpstreamError):
    """No connection: refused or unreachable, the worker's process is probably gone."""


class ConnectTimeout(UpstreamError):
    """No connection within the connect timeout."""


class ConnectionLost(UpstreamError):
    """The worker closed or reset the connection before the answer was complete."""


class BadResponse(UpstreamError):
    """The worker's answer is not valid HTTP/1.1."""


@dataclass(frozen=True)
class _Origin:
    host: str
    port: int
    tls: bool
    host_header: bytes


def _origin(base_url: str) -> _Origin:
    parts = urlsplit(base_url)
    tls = parts.scheme == "https"
    port = parts.port or (443 if tls else 80)
    host = parts.hostname or ""
    return _Origin(host, port, tls, parts.netloc.encode("latin-1"))


class _Connection(asyncio.Protocol):
    """One connection; carries one request at a time and the parser state of its answer."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        self.response: UpstreamResponse | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(BadResponse(f"unparsable answer: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        response = self.response
        if response is not None and not response.complete:
            if response.status and response.until_close:
                # An answer without Content-Length or chunking ends when the connection does.
                response._finish()
            else:
                reason = f"{type(exc).__name__}: {exc}" if exc else "closed by the worker"
                self._fail(ConnectionLost(f"connection lost before the answer was complete ({reason})"))

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.response is not None
        self.response.headers.append((name, value))

    def on_headers_complete(self) -> None:
        response = self.response
        assert response is not None
        response.status = self.parser.get_status_code()
        response.keep_alive = self.parser.should_keep_alive()
        for name, value in response.headers:
            lowered = name.lower()
            if lowered == b"content-length":
                response.content_length = int(value)
            elif lowered == b"transfer-encoding":
                response.until_close = False
        if response.content_length is not None:
            response.until_close = False
        if not response.head.done():
            response.head.set_result(None)

    def on_body(self, body: bytes) -> None:
        assert self.response is not None
        self.response._feed(body)

    def on_message_complete(self) -> None:
        assert self.response is not None
        self.response._finish()

    def send(self, data: bytes, response: UpstreamResponse) -> None:
        assert self.transport is not None
        self.response = response
        self.transport.write(data)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def _fail(self, error: UpstreamError) -> None:
        if self.response is not None:
            self.response._fail(error)


class UpstreamResponse:
    """A worker's answer: status and headers once ``UpstreamPool.request`` returns, the body as it comes."""

    def __init__(self, connection: _Connection, pool: UpstreamPool, origin: _Origin, head_only: bool) -> None:
        self._connection = connection
        self._pool = pool
        self._origin = origin
        self.head_only = head_only
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.content_length: int | None = None
        self.keep_alive = False
        self.until_close = True
        self.complete = False
        self.head: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._error: UpstreamError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._released = False

    async def read(self) -> bytes:
        """The whole body."""
        parts = [chunk async for chunk in self.chunks()]
        return b"".join(parts)

    async def chunks(self) -> AsyncIterator[bytes]:
        """Body chunks as they arrive; the connection goes back to the pool after the last one."""
        try:
            while True:
                if self._chunks:
                    chunk = self._chunks.popleft()
                    self._buffered -= len(chunk)
                    if self._buffered < HIGH_WATER and self._connection.transport is not None:
                        self._connection.transport.resume_reading()
                    yield chunk
                    continue
                if self._error is not None:
                    raise self._error
                if self.complete:
                    return
                self._waiter = asyncio.get_running_loop().create_future()
                await self._waiter
        finally:
            self.release()

    def release(self) -> None:
        """Give the connection back (answer complete, keep-alive) or close it (anything else)."""
        if self._released:
            return
        self._released = True
        connection = self._connection
        connection.response = None
        if self.complete and self.keep_alive and not self.head_only and not connection.closed:
            self._pool._put(self._origin, connection)
        else:
            connection.close()

    def _feed(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered >= HIGH_WATER and self._connection.transport is not None:
            self._connection.transport.pause_reading()
        self._wake()

    def _finish(self) -> None:
        self.complete = True
        if not self.head.done():
            self.head.set_result(None)
        self._wake()

    def _fail(self, error: UpstreamError) -> None:
        self._error = error
        if not self.head.done():
            self.head.set_exception(error)
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class UpstreamPool:
    """Keep-alive connections to every worker, reused most-recent first."""

    def __init__(self, *, connect_timeout: float = 10.0) -> None:
        self.connect_timeout = connect_timeout
        self._origins: dict[str, _Origin] = {}
        self._idle: dict[_Origin, list[_Connection]] = {}
        self._tls: ssl.SSLContext | None = None

    async def request(
        self,
        base_url: str,
        method: str,
        target: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes = b"",
    ) -> UpstreamResponse:
        """Send one request; returns once the status and headers are in. ``headers`` must not hold Host,
        Content-Length or Transfer-Encoding: the request is framed here."""
        origin = self._origins.get(base_url)
        if origin is None:
            origin = self._origins[base_url] = _origin(base_url)
        head = [
            b"%s %s HTTP/1.1\r\nhost: %s\r\n"
            % (method.encode(), target.encode("latin-1"), origin.host_header)
        ]
        for name, value in headers:
            head += (name, b": ", value, b"\r\n")
        if body or method not in ("GET", "HEAD", "DELETE", "OPTIONS"):
            head.append(b"content-length: %d\r\n" % len(body))
        head.append(b"\r\n")
        data = b"".join(head) + body
        connection = self._take(origin)
        if connection is not None:
            sent_at = time.monotonic()
            try:
                return await self._exchange(connection, origin, data, method)
            except ConnectionLost:
                # An idle connection the worker closed just as it was reused fails at once, before the request
                # was processed: once more on a new connection. A later loss is the worker's, for the caller.
                if time.monotonic() - sent_at > STALE_REUSE_S:
                    raise
        connection = await self._connect(origin)
        return await self._exchange(connection, origin, data, method)

    async def close(self) -> None:
        for connections in self._idle.values():
            for connection in connections:
                connection.close()
        self._idle.clear()

    async def _exchange(
        self, connection: _Connection, origin: _Origin, data: bytes, method: str
    ) -> UpstreamResponse:
        response = UpstreamResponse(connection, self, origin, head_only=method == "HEAD")
        connection.send(data, response)
        try:
            await response.head
        except BaseException:
            response.release()
            raise
        if response.head_only:
            response.complete = True
        return response

    def _take(self, origin: _Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        now = time.monotonic()
        while idle:
            connection = idle.pop()
            if not connection.closed and now - connection.idle_since < KEEPALIVE_S:
                return connection
            connection.close()
        return None

    def _put(self, origin: _Origin, connection: _Connection) -> None:
        connection.idle_since = time.monotonic()
        self._idle.setdefault(origin, []).append(connection)

    async def _connect(self, origin: _Origin) -> _Connection:
        loop = asyncio.get_running_loop()
        tls = None
        if origin.tls:
            tls = self._tls = self._tls or ssl.create_default_context()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, connection = await loop.create_connection(
                    _Connection,
                    origin.host,
                    origin.port,
                    ssl=tls,
                    server_hostname=origin.host if tls else None,
                )
        except TimeoutError:
            raise ConnectTimeout(f"no connection within {self.connect_timeout:g}s") from None
        except OSError as exc:
            raise ConnectFailed(f"cannot connect: {exc.strerror or exc}") from exc
        return connection
