"""One Lua script called over one dedicated, pipelined Redis connection: the buffer's write hot path.

Concurrent callers write their EVALSHA to the same socket back to back and Redis answers in order, and a call
costs a fraction of redis-py's per-command overhead (hiredis packs the commands and parses the replies). The
script must be idempotent: after a lost connection a call is sent again on a new one, as redis-py's retries do.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import select
import time
from collections.abc import Sequence
from typing import Any

import hiredis
from redis.asyncio.connection import parse_url
from redis.exceptions import ConnectionError, ResponseError

logger = logging.getLogger(__name__)

# As services.core.redis_util: 12 attempts, backoff 0.05 s doubling to 2 s, about 17 s to ride out a restart.
RETRIES = 12
BACKOFF_BASE_S = 0.05
BACKOFF_CAP_S = 2.0
CONNECT_TIMEOUT_S = 5.0


def supports(url: str) -> bool:
    """Plain TCP and unix sockets; TLS (rediss://) stays with redis-py and its TLS options."""
    return url.startswith(("redis://", "unix://"))


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.reader = hiredis.Reader(encoding="utf-8")
        self.waiters: collections.deque[asyncio.Future[Any]] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._poll: select.poll | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            self._poll = select.poll()
            self._poll.register(sock.fileno(), select.POLLIN)

    def wait_readable(self, seconds: float) -> bool:
        """Busy-wait up to ``seconds`` until the socket has data (or is closed), without reading it: the event
        loop's next poll then finds it at once. Whether it came in time."""
        if self._poll is None or self.closed:
            return False
        poll = self._poll.poll
        deadline = time.perf_counter() + seconds
        while not poll(0):
            if time.perf_counter() >= deadline:
                return False
        return True

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        error = ConnectionError(f"connection to Redis lost: {exc or 'closed by the server'}")
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(error)

    def send(self, command: bytes) -> asyncio.Future[Any]:
        waiter = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        assert self.transport is not None
        self.transport.write(command)
        return waiter


class PipelinedScript:
    """``await script(args)`` runs EVALSHA of ``source`` with no keys and ``args``; replies are decoded to str.

    ``await script(args, spin=True)``, for a caller with nothing else to do meanwhile: when it is the only call
    in flight, wait for the reply by polling the socket for up to ``SPIN_S`` (the command is written at once,
    the transport's buffer being empty) rather than sleeping in the event loop. Redis answers a write within
    ~0.1 ms on loopback, and a sleep costs a wake-up in this process and in Redis (the reply's write has to wake
    this one): with one client, writes went 10-15% faster so on the 2-core bench host, for 20-30 us more CPU per
    write. Spins that time out often (a slow or remote Redis) turn spinning off for ``SPIN_OFF_S``.
    """

    SPIN_S = 0.0005
    SPIN_OFF_S = 1.0

    def __init__(self, url: str, source: str):
        if not supports(url):
            raise ValueError(f"PipelinedScript needs a redis:// or unix:// URL, got {url.split('://')[0]}://")
        self.options = parse_url(url)
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Lock | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._spin_off_until = 0.0
        self._spin_misses = 0.0

    async def __call__(self, args: Sequence[Any], spin: bool = False) -> Any:
        command = hiredis.pack_command(("EVALSHA", self.sha, 0, *args))
        for attempt in range(RETRIES + 1):
            try:
                protocol = await self._connection()
                waiter = protocol.send(command)
                if spin and len(protocol.waiters) == 1:
                    self._spin(protocol)
                reply = await waiter
            except (ConnectionError, OSError, TimeoutError) as exc:
                if attempt == RETRIES:
                    raise ConnectionError(f"Redis unreachable after {RETRIES} retries: {exc}") from exc
                await asyncio.sleep(min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2**attempt))
                continue
            if isinstance(reply, hiredis.ReplyError):
                if str(reply).startswith("NOSCRIPT"):
                    # A restarted Redis has an empty script cache.
                    await protocol.send(hiredis.pack_command(("SCRIPT", "LOAD", self.source)))
                    continue
                raise ResponseError(str(reply))
            return reply
        raise AssertionError("unreachable: the loop returns or raises")

    def _spin(self, protocol: _Protocol) -> None:
        now = time.monotonic()
        if now < self._spin_off_until:
            return
        if protocol.wait_readable(self.SPIN_S):
            self._spin_misses = max(0.0, self._spin_misses - 0.1)
            return
        # A late reply now and then (a hiccup of the host) is no reason to stop; one spin in ten or more is.
        self._spin_misses += 1
        if self._spin_misses >= 3:
            self._spin_off_until = now + self.SPIN_OFF_S
            self._spin_misses = 0.0

    async def _connection(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            # A connection belongs to the event loop that opened it.
            self._loop, self._protocol, self._connecting = loop, None, asyncio.Lock()
        if self._protocol is not None and not self._protocol.closed:
            return self._protocol
        assert self._connecting is not None
        async with self._connecting:
            if self._protocol is None or self._protocol.closed:
                self._protocol = await asyncio.wait_for(self._connect(), CONNECT_TIMEOUT_S)
        return self._protocol

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        if "path" in self.options:
            _, protocol = await loop.create_unix_connection(_Protocol, self.options["path"])
        else:
            _, protocol = await loop.create_connection(_Protocol, self.options["host"], self.options["port"])
        setup = []
        if self.options.get("password"):
            username = self.options.get("username")
            setup.append(["AUTH", *([username] if username else []), self.options["password"]])
        if self.options.get("db"):
            setup.append(["SELECT", self.options["db"]])
        for command in setup:
            reply = await protocol.send(hiredis.pack_command(tuple(command)))
            if isinstance(reply, hiredis.ReplyError):
                protocol.transport.close()
                raise ConnectionError(f"Redis refused {command[0]}: {reply}")
        return protocol

    async def aclose(self) -> None:
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.transport.close()
        self._protocol = None
