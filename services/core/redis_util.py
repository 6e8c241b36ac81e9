"""Redis clients that reconnect with backoff, a consumer-group work queue over streams, and idempotent writes.

Delivery through ``StreamQueue`` is at-least-once: an entry stays pending until acknowledged and is reclaimed by
another consumer once its holder has been silent for ``min_idle_ms``; ``set_once``/``add_once`` make the
resulting retries harmless. See docs/redis.md for the key layout and the semantics in full.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, overload
from urllib.parse import urlsplit, urlunsplit

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

logger = logging.getLogger(__name__)

SCHEMES = ("redis", "rediss", "unix")
# With base 0.05 s and cap 2 s, 12 retries span about 17 s: enough for Redis to restart or fail over.
DEFAULT_RETRIES = 12
BACKOFF_BASE_S = 0.05
BACKOFF_CAP_S = 2.0
HEALTH_CHECK_INTERVAL_S = 15
SOCKET_TIMEOUT_S = 5.0
# A blocking read is cut into slices shorter than the socket timeout, so a long wait is never mistaken for a
# dead connection and a cancelled reader returns promptly.
BLOCK_SLICE_MS = 1000
# A consumer that has not read for this long is not counted among a group's live consumers. Consumers block in
# slices of BLOCK_SLICE_MS, so a live one is never idle much longer than that.
LIVE_CONSUMER_IDLE_MS = 30_000

FieldValue = str | bytes | int | float
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")

_ADD_ONCE_LUA = """
if redis.call('EXISTS', KEYS[2]) == 1 then
  return false
end
local cmd = {'XADD', KEYS[1]}
if tonumber(ARGV[2]) > 0 then
  table.insert(cmd, 'MAXLEN')
  if ARGV[3] == '1' then table.insert(cmd, '~') end
  table.insert(cmd, ARGV[2])
end
table.insert(cmd, '*')
for i = 4, #ARGV do table.insert(cmd, ARGV[i]) end
local id = redis.call(unpack(cmd))
if tonumber(ARGV[1]) > 0 then
  redis.call('SET', KEYS[2], id, 'PX', ARGV[1])
else
  redis.call('SET', KEYS[2], id)
end
return id
"""

_PUT_IF_ABSENT_MANY_LUA = """
local written = {}
for i, k in ipairs(KEYS) do
  local ok
  if tonumber(ARGV[1]) > 0 then
    ok = redis.call('SET', k, ARGV[i + 1], 'NX', 'PX', ARGV[1])
  else
    ok = redis.call('SET', k, ARGV[i + 1], 'NX')
  end
  written[i] = ok and 1 or 0
end
return written
"""


def redact_url(url: str) -> str:
    """The URL with any password replaced by ``***``, for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def _check_url(url: str) -> None:
    scheme = urlsplit(url).scheme if isinstance(url, str) else ""
    if scheme not in SCHEMES:
        raise ValueError(
            f"invalid Redis URL {redact_url(str(url))!r} (--redis-url): expected redis://host:port/db, "
            "rediss://host:port/db (TLS) or unix:///path/to/redis.sock"
        )


@overload
def redis_from_url(
    url: str,
    *,
    async_: Literal[True] = True,
    decode_responses: bool = True,
    retries: int = DEFAULT_RETRIES,
    socket_timeout: float | None = SOCKET_TIMEOUT_S,
    **kwargs: Any,
) -> aioredis.Redis: ...


@overload
def redis_from_url(
    url: str,
    *,
    async_: Literal[False],
    decode_responses: bool = True,
    retries: int = DEFAULT_RETRIES,
    socket_timeout: float | None = SOCKET_TIMEOUT_S,
    **kwargs: Any,
) -> redis.Redis: ...


def redis_from_url(
    url: str,
    *,
    async_: bool = True,
    decode_responses: bool = True,
    retries: int = DEFAULT_RETRIES,
    socket_timeout: float | None = SOCKET_TIMEOUT_S,
    **kwargs: Any,
) -> aioredis.Redis | redis.Redis:
    """A ``redis.asyncio`` (default) or sync client for ``redis://``, ``rediss://`` or ``unix://`` URLs.

    Commands that hit a connection error or timeout are retried ``retries`` times with exponential backoff on a
    fresh connection, so the same client keeps working after the server restarts. Replies are decoded to
    ``str`` unless ``decode_responses=False``. Extra keyword arguments go to the client unchanged.
    """
    _check_url(url)
    backoff = ExponentialBackoff(cap=BACKOFF_CAP_S, base=BACKOFF_BASE_S)
    options: dict[str, Any] = {
        "decode_responses": decode_responses,
        "retry_on_error": [RedisConnectionError, RedisTimeoutError],
        "health_check_interval": HEALTH_CHECK_INTERVAL_S,
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": SOCKET_TIMEOUT_S,
        **kwargs,
    }
    if not url.startswith("unix:"):
        # TCP keepalive notices a peer that vanished without closing the connection (a lost node, a partition).
        options.setdefault("socket_keepalive", True)
    if async_:
        return aioredis.Redis.from_url(url, retry=AsyncRetry(backoff, retries), **options)
    return redis.Redis.from_url(url, retry=Retry(backoff, retries), **options)


def wait_for_redis(url: str, timeout: float = 30.0, interval: float = 0.1) -> None:
    """Block until the Redis at ``url`` answers PING; raise ``TimeoutError`` naming the URL otherwise.

    Wrong credentials fail at once with ``ValueError``: waiting would not fix them.
    """
    _check_url(url)
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    with redis.Redis.from_url(
        url,
        retry=Retry(NoBackoff(), 0),
        socket_timeout=max(interval, 1.0),
        socket_connect_timeout=max(interval, 1.0),
    ) as client:
        while True:
            try:
                client.ping()
                return
            except redis.AuthenticationError as exc:
                raise ValueError(f"Redis at {redact_url(url)} refused the credentials: {exc}") from exc
            except redis.RedisError as exc:
                last = exc
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"Redis at {redact_url(url)} did not answer PING within {timeout:g}s (last: {last})"
                )
            time.sleep(interval)


def key(run_id: str, *parts: str | int) -> str:
    """The Redis key ``slime:<run_id>:<part>:...``; every key of a run lives under its run id."""
    if not isinstance(run_id, str) or not _RUN_ID.fullmatch(run_id):
        raise ValueError(
            f"invalid run id {run_id!r} (--run-id): use letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    texts = [str(part) for part in parts]
    if any(not text for text in texts):
        raise ValueError(f"empty key part in key({run_id!r}, {', '.join(map(repr, parts))})")
    return ":".join(["slime", run_id, *texts])


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _ttl_ms(ttl: float | None) -> int:
    if ttl is None:
        return 0
    if ttl <= 0:
        raise ValueError(f"ttl must be a positive number of seconds or None, got {ttl!r}")
    return max(1, round(ttl * 1000))


async def set_once(
    redis_client: aioredis.Redis, key: str, value: FieldValue, ttl: float | None = None
) -> bool:
    """Write ``key`` only if it does not exist (``SET NX``); True when this call wrote it. ``ttl`` in seconds."""
    ttl_ms = _ttl_ms(ttl)
    written = await redis_client.set(key, value, nx=True, px=ttl_ms or None)
    return bool(written)


async def put_if_absent_many(
    redis_client: aioredis.Redis, items: Mapping[str, FieldValue], ttl: float | None = None
) -> list[bool]:
    """``set_once`` for a batch in one atomic script; returns, per key in order, whether this call wrote it."""
    if not items:
        return []
    script = redis_client.register_script(_PUT_IF_ABSENT_MANY_LUA)
    written = await script(keys=list(items), args=[_ttl_ms(ttl), *items.values()])
    return [bool(flag) for flag in written]


@dataclass(frozen=True)
class StreamEntry:
    """One stream entry: its id (``<ms>-<seq>``) and its fields."""

    id: str
    fields: dict[str, str]


def _entry(entry_id: str | bytes, fields: Mapping[str | bytes, str | bytes]) -> StreamEntry:
    return StreamEntry(_text(entry_id), {_text(k): _text(v) for k, v in fields.items()})


def _is_nogroup(exc: ResponseError) -> bool:
    return str(exc).startswith("NOGROUP")


class StreamQueue:
    """A work queue on one Redis stream read through one consumer group: at-least-once, with reclaim.

    ``maxlen`` caps the stream length on every add (approximately, with ``~``, unless ``approximate=False``);
    trimming drops the oldest entries whether or not they were processed, so size it above the backlog, or
    acknowledge with ``delete=True`` instead. Field values are text (UTF-8).
    """

    def __init__(
        self,
        redis_client: aioredis.Redis,
        stream: str,
        group: str,
        *,
        maxlen: int | None = None,
        approximate: bool = True,
    ) -> None:
        if maxlen is not None and maxlen <= 0:
            raise ValueError(f"maxlen must be a positive integer or None, got {maxlen!r}")
        self.redis = redis_client
        self.stream = stream
        self.group = group
        self.maxlen = maxlen
        self.approximate = approximate

    async def ensure_group(self) -> None:
        """Create the stream and the group if missing; the group starts at the stream's beginning."""
        try:
            await self.redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def add(self, fields: Mapping[str, FieldValue]) -> str:
        """Append one entry; returns its id."""
        self._check_fields(fields)
        entry_id = await self.redis.xadd(
            self.stream, dict(fields), maxlen=self.maxlen, approximate=self.approximate
        )
        return _text(entry_id)

    async def add_many(self, items: Sequence[Mapping[str, FieldValue]]) -> list[str]:
        """Append entries in one round trip, atomically (MULTI/EXEC): a consumer blocked on the stream wakes once, to
        all of them, instead of to the first entry alone. Returns their ids in order."""
        for fields in items:
            self._check_fields(fields)
        async with self.redis.pipeline(transaction=True) as pipe:
            for fields in items:
                pipe.xadd(self.stream, dict(fields), maxlen=self.maxlen, approximate=self.approximate)
            ids = await pipe.execute()
        return [_text(entry_id) for entry_id in ids]

    async def add_once(
        self, fields: Mapping[str, FieldValue], *, dedup_key: str, ttl: float | None = None
    ) -> str | None:
        """Append unless ``dedup_key`` exists, atomically marking it with the new id; None for a duplicate."""
        self._check_fields(fields)
        flat: list[FieldValue] = []
        for name, value in fields.items():
            flat += [name, value]
        script = self.redis.register_script(_ADD_ONCE_LUA)
        entry_id = await script(
            keys=[self.stream, dedup_key],
            args=[_ttl_ms(ttl), self.maxlen or 0, "1" if self.approximate else "0", *flat],
        )
        return None if entry_id is None else _text(entry_id)

    async def read(self, consumer: str, count: int = 1, block_ms: int | None = None) -> list[StreamEntry]:
        """Deliver up to ``count`` new entries to ``consumer``; they stay pending until ``ack``.

        ``block_ms``: wait up to this long for entries when there are none (None or 0: do not wait).
        A missing group (e.g. Redis restarted without persistence) is recreated.
        """
        if count <= 0:
            raise ValueError(f"count must be positive, got {count!r}")
        remaining = block_ms or 0
        while True:
            block = min(remaining, BLOCK_SLICE_MS) if remaining > 0 else None
            entries = await self._read_once(consumer, count, block)
            if entries or block is None:
                return entries
            remaining -= block

    async def read_share(
        self,
        consumer: str,
        count: int,
        block_ms: int | None = None,
        *,
        live_idle_ms: int = LIVE_CONSUMER_IDLE_MS,
    ) -> list[StreamEntry]:
        """Deliver up to ``count`` new entries to ``consumer``, but no more than its share of the outstanding work
        when several consumers read the group, so that a batch added at once (``add_many``) is spread over them.

        One entry is read first (waiting up to ``block_ms``): Redis serves the consumers blocked on the stream one
        entry each, in the order they blocked. Then, without waiting, enough more to bring this consumer's pending
        entries up to ``ceil((lag + pending of the live consumers) / live consumers)``, where ``lag`` is how many
        entries no consumer has been delivered yet and a consumer is live when it read within ``live_idle_ms``:
        a consumer still busy with earlier entries takes fewer. A consumer reading alone takes up to ``count`` (two
        more round trips than ``read``); where Redis cannot tell the lag (before 7.0, or after entries were
        deleted mid-stream) a consumer with live peers takes one entry per call.
        """
        if count <= 0:
            raise ValueError(f"count must be positive, got {count!r}")
        entries = await self.read(consumer, 1, block_ms)
        if not entries or count == 1:
            return entries
        share = await self._share(consumer, count - 1, live_idle_ms)
        if share > 0:
            entries += await self.read(consumer, share)
        return entries

    async def live_consumers(self, live_idle_ms: int = LIVE_CONSUMER_IDLE_MS) -> list[str]:
        """Names of the group's consumers that read within ``live_idle_ms`` (a consumer is listed once it has read
        or been ``register``ed)."""
        try:
            consumers = await self.redis.xinfo_consumers(self.stream, self.group)
        except ResponseError as exc:
            if _is_nogroup(exc) or "no such key" in str(exc):
                return []
            raise
        return [_text(c["name"]) for c in consumers if int(c["idle"]) <= live_idle_ms]

    async def register(self, consumer: str) -> None:
        """List ``consumer`` in the group before its first read (XGROUP CREATECONSUMER), so that it counts among
        the live consumers from the start; the group is created if missing."""
        await self.ensure_group()
        await self.redis.xgroup_createconsumer(self.stream, self.group, consumer)

    async def _share(self, consumer: str, most: int, live_idle_ms: int) -> int:
        """How many more entries ``consumer`` should take (at most ``most``); see ``read_share``."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xinfo_consumers(self.stream, self.group)
            pipe.xinfo_groups(self.stream)
            consumers, groups = await pipe.execute(raise_on_error=False)
        for reply in (consumers, groups):
            if isinstance(reply, Exception):
                if isinstance(reply, ResponseError) and (_is_nogroup(reply) or "no such key" in str(reply)):
                    # The group or stream went away since the read (a Redis restart): the next read recreates it.
                    return 0
                raise reply
        pending = {_text(c["name"]): int(c["pending"]) for c in consumers if int(c["idle"]) <= live_idle_ms}
        pending.setdefault(consumer, 1)  # it has just read
        if len(pending) == 1:
            return most
        lag = next((g.get("lag") for g in groups if _text(g["name"]) == self.group), None)
        if lag is None:
            return 0
        fair = math.ceil((int(lag) + sum(pending.values())) / len(pending))
        return max(0, min(most, fair - pending[consumer]))

    async def ack(self, ids: Iterable[str], *, delete: bool = False) -> int:
        """Acknowledge entries (and with ``delete=True`` remove them from the stream); returns how many were pending."""
        id_list = list(ids)
        if not id_list:
            return 0
        if not delete:
            return int(await self.redis.xack(self.stream, self.group, *id_list))
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xack(self.stream, self.group, *id_list)
            pipe.xdel(self.stream, *id_list)
            acked, _ = await pipe.execute()
        return int(acked)

    async def reclaim(self, consumer: str, min_idle_ms: int, count: int = 10) -> list[StreamEntry]:
        """Take over up to ``count`` entries pending for at least ``min_idle_ms`` with any consumer (XAUTOCLAIM).

        Entries deleted from the stream while pending are skipped (Redis 7 also drops them from the pending list).
        """
        if count <= 0:
            raise ValueError(f"count must be positive, got {count!r}")
        claimed: list[StreamEntry] = []
        cursor = "0-0"
        while len(claimed) < count:
            try:
                reply = await self.redis.xautoclaim(
                    self.stream,
                    self.group,
                    consumer,
                    min_idle_ms,
                    start_id=cursor,
                    count=count - len(claimed),
                )
            except ResponseError as exc:
                if not _is_nogroup(exc):
                    raise
                await self.ensure_group()
                return claimed
            claimed += [_entry(i, f) for i, f in reply[1] if i is not None and f is not None]
            cursor = _text(reply[0])
            if cursor == "0-0":
                break
        if claimed:
            logger.info(
                "%s reclaimed %d entries idle >= %d ms from %s/%s",
                consumer,
                len(claimed),
                min_idle_ms,
                self.stream,
                self.group,
            )
        return claimed

    async def pending_count(self) -> int:
        """How many entries were delivered and not yet acknowledged, across all consumers."""
        try:
            summary = await self.redis.xpending(self.stream, self.group)
        except ResponseError as exc:
            if _is_nogroup(exc):
                return 0
            raise
        return int(summary["pending"])

    async def _read_once(self, consumer: str, count: int, block: int | None) -> list[StreamEntry]:
        try:
            reply = await self.redis.xreadgroup(
                self.group, consumer, {self.stream: ">"}, count=count, block=block
            )
        except ResponseError as exc:
            if not _is_nogroup(exc):
                raise
            logger.warning("consumer group %s on %s is missing; recreating it", self.group, self.stream)
            await self.ensure_group()
            reply = await self.redis.xreadgroup(
                self.group, consumer, {self.stream: ">"}, count=count, block=block
            )
        if not reply:
            return []
        return [_entry(i, f) for _, entries in reply for i, f in entries if f is not None]

    def _check_fields(self, fields: Mapping[str, FieldValue]) -> None:
        if not fields:
            raise ValueError(f"a stream entry for {self.stream!r} needs at least one field")
