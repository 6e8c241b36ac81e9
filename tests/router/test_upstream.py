"""The router's HTTP/1.1 client against real TCP servers on loopback that answer exactly the bytes a case needs:
keep-alive reuse, chunked and close-delimited bodies, streaming, stale connections, resets, garbage."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from services.core.net import free_port
from services.core.upstream import BadResponse, ConnectFailed, ConnectionLost, UpstreamPool

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class ScriptedServer:
    """A TCP server whose ``handler`` runs once per connection; counts connections."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> str:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                await self.handler(reader, writer)
            finally:
                writer.close()

        self.server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head, await reader.readexactly(length)


def answer(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n%s\r\n" % (len(body), extra) + body


async def test_keep_alive_connections_are_reused_and_requests_framed() -> None:
    seen: list[tuple[bytes, bytes]] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head, body = await read_request(reader)
            except asyncio.IncompleteReadError:
                return
            seen.append((head, body))
            writer.write(answer(b"echo:" + body, b"x-test: 1\r\n"))
            await writer.drain()

    server = ScriptedServer(handler)
    async with server as url:
        pool = UpstreamPool()
        for index in range(3):
            response = await pool.request(
                url, "POST", "/generate?x=1", [(b"content-type", b"text/plain")], b"n%d" % index
            )
            assert response.status == 200 and (b"x-test", b"1") in response.headers
            assert await response.read() == b"echo:n%d" % index
        get = await pool.request(url, "GET", "/health", [])
        assert await get.read() == b"echo:"
        await pool.close()
    assert server.connections == 1
    head, body = seen[0]
    assert (
        head.startswith(b"POST /generate?x=1 HTTP/1.1\r\n") and b"content-length: 2" in head and body == b"n0"
    )
    assert b"content-length" not in seen[3][0] and seen[3][0].startswith(b"GET /health HTTP/1.1\r\n")


async def test_chunks_arrive_before_the_answer_ends() -> None:
    release = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await writer.drain()
        await release.wait()
        writer.write(b"6\r\nsecond\r\n0\r\n\r\n")
        await writer.drain()

    async with ScriptedServer(handler) as url:
        pool = UpstreamPool()
        response = await pool.request(url, "POST", "/generate", [], b"{}")
        assert response.content_length is None
        chunks = response.chunks()
        assert await anext(chunks) == b"first"
        release.set()
        assert [chunk async for chunk in chunks] == [b"second"]
        await pool.close()


async def test_a_body_without_length_ends_with_the_connection() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nuntil the end")
        await writer.drain()

    async with ScriptedServer(handler) as url:
        pool = UpstreamPool()
        response = await pool.request(url, "GET", "/", [])
        assert await response.read() == b"until the end"
        await pool.close()


async def test_a_stale_idle_connection_is_replaced_transparently() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer(b"once"))
        await writer.drain()
        # Close as a server does with an idle keep-alive connection, without "connection: close".

    server = ScriptedServer(handler)
    async with server as url:
        pool = UpstreamPool()
        assert await (await pool.request(url, "GET", "/", [])).read() == b"once"
        await asyncio.sleep(0.05)
        assert await (await pool.request(url, "GET", "/", [])).read() == b"once"
        await pool.close()
    assert server.connections == 2


async def test_failures_say_what_happened_to_the_connection() -> None:
    pool = UpstreamPool()
    with pytest.raises(ConnectFailed, match="cannot connect"):
        await pool.request(f"http://127.0.0.1:{free_port()}", "GET", "/", [])

    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly part")
        await writer.drain()

    async with ScriptedServer(cut) as url:
        response = await pool.request(url, "GET", "/", [])
        with pytest.raises(ConnectionLost, match="before the answer was complete"):
            await response.read()

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"this is not HTTP\r\n\r\n")
        await writer.drain()

    async with ScriptedServer(garbage) as url:
        with pytest.raises(BadResponse, match="unparsable"):
            await pool.request(url, "GET", "/", [])
    await pool.close()


async def test_a_request_lost_on_a_reused_connection_is_sent_again_on_a_new_one() -> None:
    served: list[int] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = len(served) + 1
        await read_request(reader)
        served.append(connection)
        writer.write(answer(b"from %d" % connection))
        await writer.drain()
        if connection == 1:
            # The next request on this connection meets a server that is closing it (keep-alive expiry).
            await read_request(reader)

    server = ScriptedServer(handler)
    async with server as url:
        pool = UpstreamPool()
        assert await (await pool.request(url, "GET", "/", [])).read() == b"from 1"
        assert await (await pool.request(url, "GET", "/", [])).read() == b"from 2"
        await pool.close()
    assert server.connections == 2
