"""The pipelined write connection: waiting for a reply by spinning, and giving that up when replies come late."""

from __future__ import annotations

import asyncio
import time

from rollout_buffer.pipelined_redis import PipelinedScript


async def test_a_spinning_call_gets_its_reply_from_redis(redis_server) -> None:
    script = PipelinedScript(redis_server.url, "return ARGV[1] .. ARGV[2]")
    assert await script(["a", "b"], spin=True) == "ab"
    assert await script(["c", "d"]) == "cd"
    # Several calls in flight at once: none of them spins, and each gets its own reply.
    replies = await asyncio.gather(*(script([str(i), "x"], spin=True) for i in range(5)))
    assert replies == [f"{i}x" for i in range(5)]
    await script.aclose()


async def test_spinning_stops_for_a_while_when_replies_keep_coming_late(redis_server) -> None:
    """A Redis that takes 20 ms per call (overloaded, or far away): spinning the event loop for it would waste CPU.
    The script keeps the real Redis busy for 20 ms before it answers."""
    slow = """
        local t = redis.call('TIME')
        local start = t[1] * 1000000 + t[2]
        repeat t = redis.call('TIME') until t[1] * 1000000 + t[2] - start >= 20000
        return 'ok'
    """
    script = PipelinedScript(redis_server.url, slow)
    assert await script(["x"], spin=True) == "ok"
    assert script._spin_off_until == 0.0
    for _ in range(2):
        assert await script(["x"], spin=True) == "ok"
    assert script._spin_off_until > time.monotonic()
    assert await script(["x"], spin=True) == "ok"
    await script.aclose()
