"""Wake-ups for the lease calls that wait for complete groups: the store's scripts publish on a run's queue channel
whenever groups become leasable there, and one subscriber connection per process turns the messages into events.

The subscription is a hint, never the only way a waiter learns of a group: a waiter still re-checks the store on
its own now and then, so a message lost while the subscriber reconnects (Redis restarted) delays a lease, and
every (re)subscription wakes all waiters to re-check at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import redis.asyncio as aioredis
from redis.exceptions import RedisError

logger = logging.getLogger(__name__)

# Reconnection backoff, as services.core.redis_util: 0.05 s doubling up to 2 s.
_BACKOFF_BASE_S = 0.05
_BACKOFF_CAP_S = 2.0


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


class ReadySignal:
    """Subscribes (on the first ``watch``) to ``pattern`` on a connection of ``redis_client``'s pool; redis-py
    reconnects it and subscribes again within its retries, this class beyond them."""

    def __init__(self, redis_client: aioredis.Redis, pattern: str):
        self.redis = redis_client
        self.pattern = pattern
        # Per channel, the event of the waiters since the channel's last message; a message sets and drops it.
        self._events: dict[str, asyncio.Event] = {}
        self._listener: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    def watch(self, channel: str) -> asyncio.Event:
        """The event that the next message on ``channel`` (or the next (re)subscription) sets. Take it before
        checking the store, then wait on it: a message that comes in between is not missed."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            # Events and the listener belong to the event loop that made them.
            self._loop, self._events, self._listener = loop, {}, None
        if self._listener is None and not self._closed:
            self._listener = loop.create_task(self._listen(), name="ready-signal")
        event = self._events.get(channel)
        if event is None:
            event = self._events[channel] = asyncio.Event()
        return event

    async def aclose(self) -> None:
        """Stop listening for good; a waiter that still waits wakes at its re-check."""
        self._closed = True
        listener, self._listener = self._listener, None
        if listener is not None and listener.get_loop() is asyncio.get_running_loop():
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener

    def _wake(self, channel: str) -> None:
        event = self._events.pop(channel, None)
        if event is not None:
            event.set()

    def _wake_all(self) -> None:
        events, self._events = self._events, {}
        for event in events.values():
            event.set()

    async def _listen(self) -> None:
        subscriptions = 0
        failures = 0
        while True:
            pubsub = self.redis.pubsub()
            try:
                await pubsub.psubscribe(self.pattern)
                while True:
                    message = await pubsub.get_message(timeout=None)
                    if message is None:
                        continue
                    if message["type"] == "pmessage":
                        self._wake(_text(message["channel"]))
                    elif message["type"] == "psubscribe":
                        # Again after every reconnection: what was published while away is lost, so look now.
                        subscriptions += 1
                        if subscriptions > 1:
                            logger.info("ready signal: subscribed to %s again", self.pattern)
                        failures = 0
                        self._wake_all()
            except (RedisError, OSError) as exc:
                failures += 1
                if failures == 1:
                    logger.warning(
                        "ready signal: no subscription to %s (%s: %s); waiting leases re-check the store "
                        "on their own until there is one again",
                        self.pattern,
                        type(exc).__name__,
                        exc,
                    )
            finally:
                await pubsub.aclose()
            await asyncio.sleep(min(_BACKOFF_CAP_S, _BACKOFF_BASE_S * 2 ** (failures - 1)))
