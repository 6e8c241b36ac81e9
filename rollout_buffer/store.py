"""The durable trajectory store: groups of items in Redis, idempotent by uid, leased and acknowledged, bounded.

Every state change is one Lua script, so a crash of the service at any point leaves Redis consistent and Redis'
own persistence (AOF) decides durability. Concurrent writes are group-committed: they travel as segments of one
script call. Layout under ``slime:<run>:buf`` (P):

- ``P:uid:<uid>`` -> group member, with a TTL: the idempotency record of every stored item.
- ``P:gonce:<token>``: a whole-group write that already happened (a rollout worker's task retried).
- ``P:open:<kind>:<instance>`` list of item JSON, ``P:oinfo:<kind>:<instance>`` its hash (size, queue, bytes,
  created); ``P:opens`` zset member -> last write time (ms), scanned for expiry.
- ``P:g:<gid>`` list of item JSON of a sealed group, ``P:ginfo:<gid>`` its hash; ``P:ready:<queue>:<kind>`` FIFO
  lists of sealed gids; ``P:leased`` zset gid -> lease deadline (ms); ``P:lease`` hash gid -> lease id.
- ``P:usage`` hash {items, bytes} of everything not yet acknowledged (the capacity bound); ``P:counters``
  run-wide totals; ``P:config`` the run's group size and task type (set by /start_rollout);
  ``P:generator:<task type>`` the lock of the process running that task's generator (service.py).

Every script that makes groups leasable (sealing them, or putting back an expired or released lease) publishes once
per queue it touched on the channel ``P:ready-signal:<queue>``; ``ready_signal.py`` wakes the waiting leases.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

import orjson
import redis.asyncio as aioredis

from rollout_buffer import pipelined_redis
from rollout_buffer.pipelined_redis import PipelinedScript
from rollout_buffer.ready_signal import ReadySignal
from services.core.redis_util import key

logger = logging.getLogger(__name__)

KIND_TRAJECTORY = "trajectory"
KIND_SAMPLE = "sample"
KINDS = (KIND_SAMPLE, KIND_TRAJECTORY)
QUEUE_TRAIN = "train"
QUEUE_EVAL = "eval"
QUEUES = (QUEUE_TRAIN, QUEUE_EVAL)

ExpiryAction = Literal["drop", "deliver"]

# How often a waiting lease re-checks the store without a ready signal: what a lost signal can cost at most.
READY_RECHECK_S = 1.0
# Every run's ready channels (``ready_channel``, keys as redis_util.key makes them); a run id holds neither ':' nor
# glob characters, so nothing else matches.
_READY_PATTERN = "slime:*:buf:ready-signal:*"

# Shared Lua: server time in ms, sealing an open group into a ready one, putting expired leases back, and the
# ready signal: one PUBLISH per queue that got ready groups, sent by the script at its end.
_LUA_COMMON = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- pcall: the signal is a hint, and a Redis user without rights on the channel (ACL) must still write.
local readied = {}
local function signal_ready(p)
  for queue, n in pairs(readied) do redis.pcall('PUBLISH', p .. ':ready-signal:' .. queue, n) end
end

-- count: the group's item count when the caller knows it (saves an LLEN). Callers add to the 'sealed' counter.
local function seal(p, m, now, partial, count)
  local okey = p .. ':open:' .. m
  local ikey = p .. ':oinfo:' .. m
  local info = redis.call('HMGET', ikey, 'iid', 'kind', 'queue', 'size', 'created', 'bytes', 'task_type')
  local gid = tostring(redis.call('INCR', p .. ':seq'))
  count = count or redis.call('LLEN', okey)
  redis.call('RENAME', okey, p .. ':g:' .. gid)
  redis.call('HSET', p .. ':ginfo:' .. gid, 'iid', info[1], 'kind', info[2], 'queue', info[3], 'size', info[4],
    'created', info[5], 'bytes', info[6], 'task_type', info[7] or '', 'count', count, 'sealed', now,
    'partial', partial, 'redeliveries', 0)
  redis.call('DEL', ikey)
  redis.call('ZREM', p .. ':opens', m)
  redis.call('RPUSH', p .. ':ready:' .. info[3] .. ':' .. info[2], gid)
  readied[info[3]] = (readied[info[3]] or 0) + 1
  return gid
end

local function requeue_expired(p, now, limit)
  local gids = redis.call('ZRANGEBYSCORE', p .. ':leased', '-inf', now, 'LIMIT', 0, limit)
  for _, gid in ipairs(gids) do
    redis.call('ZREM', p .. ':leased', gid)
    redis.call('HDEL', p .. ':lease', gid)
    local info = redis.call('HMGET', p .. ':ginfo:' .. gid, 'queue', 'kind')
    if info[1] then
      redis.call('HINCRBY', p .. ':ginfo:' .. gid, 'redeliveries', 1)
      -- Back to the head: these groups are older than anything sealed since they were leased.
      redis.call('LPUSH', p .. ':ready:' .. info[1] .. ':' .. info[2], gid)
      readied[info[1]] = (readied[info[1]] or 0) + 1
    end
  end
  if #gids > 0 then redis.call('HINCRBY', p .. ':counters', 'lease_expired', #gids) end
  return #gids
end
"""

# One call stores several independent writes (segments) from concurrent requests: each segment is all or
# nothing and idempotent on its own, and the run's counters are updated once per call.
# ARGV: prefix, max_items, max_bytes, dedup_ttl_ms, default_size, then per segment: seal_by_size, group_token,
# task_type, item count, and 6 fields per item: uid, kind, instance, queue, size (0 = the run's), payload.
# Returns per segment {'ok', flags ('1' stored, '0' duplicate), sealed gids} | {'dup_group'} | {'full', items, bytes}.
_WRITE_LUA = (
    _LUA_COMMON
    + """
local p = ARGV[1]
local max_items = tonumber(ARGV[2])
local max_bytes = tonumber(ARGV[3])
local ttl = ARGV[4]
local default_size = tonumber(ARGV[5])
local usage = redis.call('HMGET', p .. ':usage', 'items', 'bytes')
local held_items = tonumber(usage[1]) or 0
local held_bytes = tonumber(usage[2]) or 0
local written, duplicates, rejected, sealed_groups = 0, 0, 0, 0
local now = now_ms()
local results = {}
local b = 5
while b < #ARGV do
  local seal_by_size = ARGV[b + 1] == '1'
  local token = ARGV[b + 2]
  local task_type = ARGV[b + 3]
  local n = tonumber(ARGV[b + 4])
  local first = b + 4
  b = first + 6 * n
  if token ~= '' and redis.call('EXISTS', p .. ':gonce:' .. token) == 1 then
    duplicates = duplicates + n
    table.insert(results, {'dup_group'})
  else
    -- Each new item's idempotency record is taken first; a refused (full) segment gives them back below.
    local status = {}
    local new_items, new_bytes = 0, 0
    for i = 1, n do
      local f = first + (i - 1) * 6
      if redis.call('SET', p .. ':uid:' .. ARGV[f + 1], ARGV[f + 2] .. ':' .. ARGV[f + 3], 'NX', 'PX', ttl) then
        status[i] = '1'
        new_items = new_items + 1
        new_bytes = new_bytes + #ARGV[f + 6]
      else
        status[i] = '0'
      end
    end
    if new_items > 0 and (held_items + new_items > max_items or held_bytes + new_bytes > max_bytes) then
      for i = 1, n do
        if status[i] == '1' then redis.call('DEL', p .. ':uid:' .. ARGV[first + (i - 1) * 6 + 1]) end
      end
      rejected = rejected + n
      table.insert(results, {'full', held_items, held_bytes})
    else
      local sealed = {}
      for i = 1, n do
        if status[i] == '1' then
          local f = first + (i - 1) * 6
          local m = ARGV[f + 2] .. ':' .. ARGV[f + 3]
          local ikey = p .. ':oinfo:' .. m
          local payload = ARGV[f + 6]
          -- Open lists and their info hashes come and go together, so a first item means a new group.
          local count = redis.call('RPUSH', p .. ':open:' .. m, payload)
          local size
          if count == 1 then
            size = tonumber(ARGV[f + 5])
            if size <= 0 then
              size = tonumber(redis.call('HGET', p .. ':config', 'group_size')) or default_size
            end
            redis.call('HSET', ikey, 'iid', ARGV[f + 3], 'kind', ARGV[f + 2], 'queue', ARGV[f + 4], 'size', size,
              'created', now, 'bytes', #payload, 'task_type', task_type)
          else
            size = tonumber(redis.call('HGET', ikey, 'size'))
            redis.call('HINCRBY', ikey, 'bytes', #payload)
          end
          if seal_by_size and count >= size then
            table.insert(sealed, seal(p, m, now, 0, count))
          else
            redis.call('ZADD', p .. ':opens', now, m)
          end
        end
      end
      sealed_groups = sealed_groups + #sealed
      held_items = held_items + new_items
      held_bytes = held_bytes + new_bytes
      written = written + new_items
      duplicates = duplicates + n - new_items
      if token ~= '' then redis.call('SET', p .. ':gonce:' .. token, 1, 'PX', ttl) end
      table.insert(results, {'ok', table.concat(status), sealed})
    end
  end
end
if written > 0 then
  redis.call('HSET', p .. ':usage', 'items', held_items, 'bytes', held_bytes)
  redis.call('HINCRBY', p .. ':counters', 'written', written)
end
if duplicates > 0 then redis.call('HINCRBY', p .. ':counters', 'duplicates', duplicates) end
if rejected > 0 then redis.call('HINCRBY', p .. ':counters', 'rejected_full', rejected) end
if sealed_groups > 0 then redis.call('HINCRBY', p .. ':counters', 'sealed', sealed_groups) end
signal_ready(p)
return results
"""
)

# ARGV: prefix, member, expected item count. Seals an open group that a task's is_valid_group accepted, unless
# it changed (more items) since it was validated.
_SEAL_LUA = (
    _LUA_COMMON
    + """
local p = ARGV[1]
local m = ARGV[2]
if redis.call('EXISTS', p .. ':oinfo:' .. m) == 0 then return {'gone'} end
if redis.call('LLEN', p .. ':open:' .. m) ~= tonumber(ARGV[3]) then return {'changed'} end
local gid = seal(p, m, now_ms(), 0, tonumber(ARGV[3]))
redis.call('HINCRBY', p .. ':counters', 'sealed', 1)
signal_ready(p)
return {'sealed', gid}
"""
)

# ARGV: prefix, max_groups, min_groups, lease_ms, then the ready lists to pop from, in order. Leases nothing unless
# min_groups are ready. Returns {requeued, groups, ms until the run's next lease runs out (-1: none) if none leased}.
_LEASE_LUA = (
    _LUA_COMMON
    + """
local p = ARGV[1]
local want = tonumber(ARGV[2])
local min_groups = tonumber(ARGV[3])
local lease_ms = tonumber(ARGV[4])
local now = now_ms()
local requeued = requeue_expired(p, now, 1000)
signal_ready(p)
if min_groups > 1 then
  local ready = 0
  for i = 5, #ARGV do ready = ready + redis.call('LLEN', p .. ':ready:' .. ARGV[i]) end
  if ready < min_groups then want = 0 end
end
local out = {}
for i = 5, #ARGV do
  if want <= 0 then break end
  local gids = redis.call('LPOP', p .. ':ready:' .. ARGV[i], want)
  if gids then
    for _, gid in ipairs(gids) do
      local lease_id = gid .. '.' .. redis.call('INCR', p .. ':leaseseq')
      redis.call('ZADD', p .. ':leased', now + lease_ms, gid)
      redis.call('HSET', p .. ':lease', gid, lease_id)
      table.insert(out, {gid, lease_id, redis.call('HGETALL', p .. ':ginfo:' .. gid),
        redis.call('LRANGE', p .. ':g:' .. gid, 0, -1)})
    end
    want = want - #gids
  end
end
if #out > 0 then
  redis.call('HINCRBY', p .. ':counters', 'leased', #out)
  return {requeued, out, -1}
end
-- A waiting caller wakes when the next lease runs out: nothing is published then.
local next_expiry = redis.call('ZRANGE', p .. ':leased', 0, 0, 'WITHSCORES')
return {requeued, out, next_expiry[2] and math.max(0, tonumber(next_expiry[2]) - now) or -1}
"""
)

# ARGV: prefix, lease ids. Deletes each group whose current lease is the given one.
_ACK_LUA = """
local p = ARGV[1]
local acked = {}
for i = 2, #ARGV do
  local lease_id = ARGV[i]
  local gid = string.match(lease_id, '^(%d+)%.%d+$')
  if gid and redis.call('HGET', p .. ':lease', gid) == lease_id then
    local info = redis.call('HMGET', p .. ':ginfo:' .. gid, 'count', 'bytes')
    redis.call('DEL', p .. ':g:' .. gid, p .. ':ginfo:' .. gid)
    redis.call('HDEL', p .. ':lease', gid)
    redis.call('ZREM', p .. ':leased', gid)
    redis.call('HINCRBY', p .. ':usage', 'items', -(tonumber(info[1]) or 0))
    redis.call('HINCRBY', p .. ':usage', 'bytes', -(tonumber(info[2]) or 0))
    table.insert(acked, lease_id)
  end
end
if #acked > 0 then redis.call('HINCRBY', p .. ':counters', 'acked', #acked) end
return acked
"""

# ARGV: prefix, limit. Every leased group of the run back to the head of its ready list, whatever its deadline.
_RELEASE_LUA = (
    _LUA_COMMON
    + """
local released = requeue_expired(ARGV[1], '+inf', tonumber(ARGV[2]))
signal_ready(ARGV[1])
return released
"""
)

# ARGV: prefix, timeout_ms, action (drop|deliver), limit. Handles open groups idle for longer than the timeout.
_EXPIRE_LUA = (
    _LUA_COMMON
    + """
local p = ARGV[1]
local now = now_ms()
local members = redis.call('ZRANGEBYSCORE', p .. ':opens', '-inf', now - tonumber(ARGV[2]), 'LIMIT', 0,
  tonumber(ARGV[4]))
local dropped_items = 0
for _, m in ipairs(members) do
  if ARGV[3] == 'deliver' then
    seal(p, m, now, 1)
  else
    local okey = p .. ':open:' .. m
    local ikey = p .. ':oinfo:' .. m
    local count = redis.call('LLEN', okey)
    local bytes = tonumber(redis.call('HGET', ikey, 'bytes')) or 0
    redis.call('DEL', okey, ikey)
    redis.call('ZREM', p .. ':opens', m)
    redis.call('HINCRBY', p .. ':usage', 'items', -count)
    redis.call('HINCRBY', p .. ':usage', 'bytes', -bytes)
    dropped_items = dropped_items + count
  end
end
if #members > 0 then
  redis.call('HINCRBY', p .. ':counters', 'expired', #members)
  if ARGV[3] == 'deliver' then redis.call('HINCRBY', p .. ':counters', 'sealed', #members) end
end
signal_ready(p)
return {#members, dropped_items}
"""
)


class _WriteCoalescer:
    """Group commit for one run's writes. The writes submitted while the event loop runs one round of ready
    callbacks (the requests that arrived together) go to Redis as segments of one call, sent when that round
    is over; while ``MAX_IN_FLIGHT`` calls are in flight, later writes wait and go together when one returns.
    Each segment is still all-or-nothing and idempotent on its own.

    A writer that has had the buffer to itself for ``SPIN_QUIET_S`` (each call one segment, sent with no other
    call in flight or waiting) asks ``call`` to spin for its reply (``PipelinedScript``): the event loop has
    nothing else to do meanwhile. Any overlap of writes stops that for ``SPIN_QUIET_S``."""

    MAX_SEGMENTS = 512
    # Two calls in flight keep the connection busy while one reply is on its way back.
    MAX_IN_FLIGHT = 2
    SPIN_QUIET_S = 0.1

    def __init__(self, call: Callable[[list[Any], bool], Awaitable[Any]], header: list[Any]):
        self.call = call
        self.header = header
        self._pending: list[tuple[list[Any], asyncio.Future[Any]]] = []
        self._in_flight = 0
        self._send_scheduled = False
        self._crowded_at = -math.inf
        # The event loop keeps only weak references to tasks.
        self._calls: set[asyncio.Task[None]] = set()

    async def submit(self, segment: list[Any]) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._pending.append((segment, future))
        if not self._send_scheduled and self._in_flight < self.MAX_IN_FLIGHT:
            # call_soon runs after every callback already queued: the requests of this round join this call.
            self._send_scheduled = True
            loop.call_soon(self._send_pending)
        return await future

    def _send_pending(self) -> None:
        self._send_scheduled = False
        while self._pending and self._in_flight < self.MAX_IN_FLIGHT:
            batch, self._pending = self._pending[: self.MAX_SEGMENTS], self._pending[self.MAX_SEGMENTS :]
            now = time.monotonic()
            if len(batch) > 1 or self._pending or self._in_flight:
                self._crowded_at = now
            spin = now - self._crowded_at > self.SPIN_QUIET_S
            self._in_flight += 1
            call = asyncio.get_running_loop().create_task(self._send(batch, spin))
            self._calls.add(call)
            call.add_done_callback(self._calls.discard)

    async def _send(self, batch: list[tuple[list[Any], asyncio.Future[Any]]], spin: bool) -> None:
        args = list(self.header)
        for segment, _ in batch:
            args += segment
        try:
            replies = await self.call(args, spin)
        except asyncio.CancelledError:
            # The event loop is shutting down: the writers' outcome is unknown, as after a lost connection.
            for _, future in batch:
                future.cancel()
            raise
        except Exception as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
        else:
            for (_, future), reply in zip(batch, replies, strict=True):
                if not future.done():
                    future.set_result(reply)
        finally:
            self._in_flight -= 1
        # The writes that queued up while this call was in flight go now, together.
        self._send_pending()


class WriteStatus(StrEnum):
    STORED = "stored"
    DUPLICATE = "duplicate"


@dataclass(frozen=True)
class NewItem:
    """One item to store: its uid (idempotency key), the group it joins and its JSON payload."""

    uid: str
    instance_id: str
    payload: bytes
    kind: str = KIND_TRAJECTORY
    queue: str = QUEUE_TRAIN
    # Items that complete this group; 0 means the run's group size (from /start_rollout, else the default).
    group_size: int = 0


@dataclass(frozen=True)
class WriteResult:
    statuses: list[WriteStatus]
    sealed: list[str]

    @property
    def stored(self) -> int:
        return sum(status is WriteStatus.STORED for status in self.statuses)

    @property
    def duplicates(self) -> int:
        return len(self.statuses) - self.stored


@dataclass
class Group:
    """A sealed, leased group: what the trainer (or an agent's reader) receives."""

    group_id: str
    lease_id: str
    instance_id: str
    kind: str
    queue: str
    items: list[dict[str, Any]]
    sealed_at_ms: int
    partial: bool = False
    redeliveries: int = 0
    task_type: str = ""


@dataclass
class LeaseResult:
    groups: list[Group]
    requeued: int = 0
    # When nothing was leased: seconds until the run's next lease runs out (its group is leasable again then).
    next_expiry_s: float | None = None


@dataclass
class BufferStats:
    """Run-wide counts for operators: what is open, ready, leased and how old the oldest ready group is."""

    run_id: str
    open_groups: int
    ready_groups: dict[str, int]
    leased_groups: int
    items: int
    bytes: int
    max_items: int
    max_bytes: int
    oldest_ready_age_s: float | None
    # How long the open group written to least recently has been idle (the group timeout applies to this).
    longest_open_idle_s: float | None
    group_size: int
    task_type: str | None
    totals: dict[str, int] = field(default_factory=dict)

    @property
    def complete_groups(self) -> int:
        return sum(self.ready_groups.values()) + self.leased_groups


class BufferFullError(Exception):
    """The write would take the run over its item or byte budget; nothing of it was stored."""

    def __init__(self, items: int, bytes_: int, max_items: int, max_bytes: int):
        self.items = items
        self.bytes = bytes_
        self.max_items = max_items
        self.max_bytes = max_bytes
        super().__init__(
            f"rollout buffer is full: {items}/{max_items} items, {bytes_}/{max_bytes} bytes held until acknowledged"
        )


@dataclass(frozen=True)
class StoreLimits:
    """Capacity and timing policy of the store; the service's flags fill it."""

    group_size: int = 1
    max_items: int = 1_000_000
    max_bytes: int = 4 << 30
    dedup_ttl_s: float = 86_400.0
    lease_timeout_s: float = 300.0
    group_timeout_s: float | None = None
    expiry_action: ExpiryAction = "drop"

    def __post_init__(self) -> None:
        if self.group_size < 1:
            raise ValueError(f"group size (--n-samples-per-prompt) must be >= 1, got {self.group_size}")
        if self.max_items < 1 or self.max_bytes < 1:
            raise ValueError("--buffer-max-items and --buffer-max-bytes must be >= 1")
        if self.lease_timeout_s <= 0:
            raise ValueError(f"--lease-timeout must be > 0 seconds, got {self.lease_timeout_s}")
        if self.group_timeout_s is not None and self.group_timeout_s <= 0:
            raise ValueError(f"--group-timeout must be > 0 seconds, got {self.group_timeout_s}")


def _ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


class BufferStore:
    """Async access to the run-namespaced buffer in one Redis; every method is safe to call from many processes."""

    def __init__(
        self,
        redis_client: aioredis.Redis,
        limits: StoreLimits | None = None,
        *,
        redis_url: str | None = None,
        ready_recheck_s: float = READY_RECHECK_S,
    ):
        """``redis_url`` (the one ``redis_client`` was made from) puts writes on a pipelined connection of their
        own; without it, or for TLS, writes go through ``redis_client``. ``ready_recheck_s``: how often a waiting
        ``lease_wait`` looks at the store when no ready signal came."""
        self.redis = redis_client
        self.limits = limits or StoreLimits()
        self.ready_recheck_s = ready_recheck_s
        # Subscribed on the first wait: processes that never wait (writers, the trainer) hold no subscription.
        self.ready_signal = ReadySignal(redis_client, _READY_PATTERN)
        self._pipelined: PipelinedScript | None = None
        self._write_call: Callable[[list[Any], bool], Awaitable[Any]]
        if redis_url is not None and pipelined_redis.supports(redis_url):
            self._pipelined = PipelinedScript(redis_url, _WRITE_LUA)
            self._write_call = self._pipelined
        else:
            script = redis_client.register_script(_WRITE_LUA)
            self._write_call = lambda args, spin: script(args=args)
        self._coalescers: dict[str, _WriteCoalescer] = {}
        self._seal = redis_client.register_script(_SEAL_LUA)
        self._lease = redis_client.register_script(_LEASE_LUA)
        self._ack = redis_client.register_script(_ACK_LUA)
        self._expire = redis_client.register_script(_EXPIRE_LUA)
        self._release = redis_client.register_script(_RELEASE_LUA)

    async def aclose(self) -> None:
        """Close the write connection and the ready signal's subscription (the shared client belongs to the
        caller)."""
        await self.ready_signal.aclose()
        if self._pipelined is not None:
            await self._pipelined.aclose()

    @staticmethod
    def prefix(run_id: str) -> str:
        return key(run_id, "buf")

    @classmethod
    def ready_channel(cls, run_id: str, queue: str) -> str:
        """The channel the scripts publish on when groups of ``queue`` become leasable."""
        return f"{cls.prefix(run_id)}:ready-signal:{queue}"

    async def write(
        self,
        run_id: str,
        items: Sequence[NewItem],
        *,
        seal_by_size: bool = True,
        group_token: str | None = None,
        task_type: str = "",
    ) -> WriteResult:
        """Store the items that are new (by uid) atomically, all or nothing; raise BufferFullError when over budget.

        ``seal_by_size``: seal a group as soon as it holds its group size (off when the task's is_valid_group
        decides). ``group_token``: the write happens at most once per token (a retried task is a no-op).
        """
        if not items:
            return WriteResult([], [])
        limits = self.limits
        coalescer = self._coalescers.get(run_id)
        if coalescer is None:
            header = [
                self.prefix(run_id),
                limits.max_items,
                limits.max_bytes,
                _ms(limits.dedup_ttl_s),
                limits.group_size,
            ]
            coalescer = self._coalescers[run_id] = _WriteCoalescer(self._write_call, header)
        segment: list[Any] = ["1" if seal_by_size else "0", group_token or "", task_type, len(items)]
        for item in items:
            segment += [item.uid, item.kind, item.instance_id, item.queue, item.group_size, item.payload]
        reply = await coalescer.submit(segment)
        tag = reply[0]
        if tag == "dup_group":
            return WriteResult([WriteStatus.DUPLICATE] * len(items), [])
        if tag == "full":
            raise BufferFullError(int(reply[1]), int(reply[2]), limits.max_items, limits.max_bytes)
        statuses = [WriteStatus.STORED if flag == "1" else WriteStatus.DUPLICATE for flag in reply[1]]
        return WriteResult(statuses, [str(gid) for gid in reply[2]])

    async def open_items(self, run_id: str, kind: str, instance_id: str) -> list[dict[str, Any]]:
        """The items of an open (not yet sealed) group, in write order; empty when there is none."""
        raw = await self.redis.lrange(f"{self.prefix(run_id)}:open:{kind}:{instance_id}", 0, -1)
        return [orjson.loads(item) for item in raw]

    async def seal_if_unchanged(self, run_id: str, kind: str, instance_id: str, count: int) -> str | None:
        """Seal an open group that still holds exactly ``count`` items; its gid, or None if it changed or is gone."""
        reply = await self._seal(args=[self.prefix(run_id), f"{kind}:{instance_id}", count])
        return str(reply[1]) if reply[0] == "sealed" else None

    async def lease(
        self,
        run_id: str,
        max_groups: int,
        *,
        min_groups: int = 1,
        lease_seconds: float | None = None,
        queue: str = QUEUE_TRAIN,
        kinds: Sequence[str] = KINDS,
    ) -> LeaseResult:
        """Lease up to ``max_groups`` ready groups (oldest first), none unless ``min_groups`` are ready;
        unacknowledged leases return after the timeout."""
        if max_groups <= 0:
            return LeaseResult([])
        lease_s = lease_seconds or self.limits.lease_timeout_s
        reply = await self._lease(
            args=[
                self.prefix(run_id),
                max_groups,
                min_groups,
                _ms(lease_s),
                *(f"{queue}:{kind}" for kind in kinds),
            ]
        )
        requeued, rows, next_expiry_ms = int(reply[0]), reply[1], int(reply[2])
        groups = []
        for gid, lease_id, info_flat, items in rows:
            info = dict(zip(info_flat[::2], info_flat[1::2], strict=True))
            groups.append(
                Group(
                    group_id=str(gid),
                    lease_id=str(lease_id),
                    instance_id=info.get("iid", ""),
                    kind=info.get("kind", KIND_TRAJECTORY),
                    queue=info.get("queue", queue),
                    items=[orjson.loads(item) for item in items],
                    sealed_at_ms=int(info.get("sealed", 0)),
                    partial=info.get("partial") == "1",
                    redeliveries=int(info.get("redeliveries", 0)),
                    task_type=info.get("task_type", ""),
                )
            )
        return LeaseResult(groups, requeued, None if groups or next_expiry_ms < 0 else next_expiry_ms / 1000)

    async def lease_wait(
        self,
        run_id: str,
        max_groups: int,
        *,
        min_groups: int = 1,
        wait_seconds: float = 0.0,
        lease_seconds: float | None = None,
        queue: str = QUEUE_TRAIN,
        kinds: Sequence[str] = KINDS,
        poll_seconds: float | None = None,
    ) -> LeaseResult:
        """``lease`` once at least ``min_groups`` are ready, waiting up to ``wait_seconds`` (then take what is there).

        The wait ends when the ready signal of the run's ``queue`` comes, when a lease runs out, or every
        ``ready_recheck_s`` in case a signal was lost. ``poll_seconds``: look every that many seconds instead,
        without the signal (the behaviour before it, kept as the benchmarks' baseline).
        """
        deadline = time.monotonic() + wait_seconds
        channel = self.ready_channel(run_id, queue)
        requeued = 0
        while True:
            final = min_groups <= 0 or time.monotonic() >= deadline
            # Taken before looking, so that a group sealed between the look and the wait is not missed.
            signal = None if final or poll_seconds is not None else self.ready_signal.watch(channel)
            result = await self.lease(
                run_id,
                max_groups,
                min_groups=0 if final else min_groups,
                lease_seconds=lease_seconds,
                queue=queue,
                kinds=kinds,
            )
            requeued += result.requeued
            # Nothing leased: fewer than min_groups were ready, or another reader took them first.
            if result.groups or final:
                result.requeued = requeued
                return result
            pause = min(deadline - time.monotonic(), poll_seconds or self.ready_recheck_s)
            if result.next_expiry_s is not None:
                pause = min(pause, result.next_expiry_s)
            if signal is None:
                await asyncio.sleep(max(0.0, pause))
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, pause)):
                    await signal.wait()

    async def ack(self, run_id: str, lease_ids: Sequence[str]) -> list[str]:
        """Delete the groups held under these leases for good; returns the lease ids that were current."""
        if not lease_ids:
            return []
        return [str(x) for x in await self._ack(args=[self.prefix(run_id), *lease_ids])]

    async def release_leases(self, run_id: str, limit: int = 100_000) -> int:
        """Return every group leased in ``run_id`` to the ready queues now, without waiting for its lease to run out;
        how many. For a trainer that restarts: the leases of a run's one trainer are its dead predecessor's."""
        return int(await self._release(args=[self.prefix(run_id), limit]))

    async def expire_open_groups(self, run_id: str, limit: int = 1000) -> tuple[int, int]:
        """Apply the group timeout to idle open groups; returns (groups expired, items dropped)."""
        timeout = self.limits.group_timeout_s
        if timeout is None:
            return 0, 0
        groups, items = await self._expire(
            args=[self.prefix(run_id), _ms(timeout), self.limits.expiry_action, limit]
        )
        return int(groups), int(items)

    async def group_done(self, run_id: str, token: str) -> bool:
        """Whether a whole-group write under ``token`` already happened."""
        return bool(await self.redis.exists(f"{self.prefix(run_id)}:gonce:{token}"))

    async def set_run_config(
        self, run_id: str, *, group_size: int | None = None, task_type: str | None = None
    ) -> None:
        values: dict[str, Any] = {}
        if group_size is not None:
            values["group_size"] = group_size
        if task_type is not None:
            values["task_type"] = task_type
        if values:
            await self.redis.hset(f"{self.prefix(run_id)}:config", mapping=values)

    async def run_config(self, run_id: str) -> tuple[int, str | None]:
        """The run's (group size, task type): what /start_rollout set, else the service defaults."""
        size, task_type = await self.redis.hmget(f"{self.prefix(run_id)}:config", ["group_size", "task_type"])
        return (int(size) if size else self.limits.group_size), task_type

    async def stats(self, run_id: str) -> BufferStats:
        p = self.prefix(run_id)
        ready_keys = [(queue, kind) for queue in QUEUES for kind in KINDS]
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.time()
            pipe.zcard(f"{p}:opens")
            for queue, kind in ready_keys:
                pipe.llen(f"{p}:ready:{queue}:{kind}")
            pipe.zcard(f"{p}:leased")
            pipe.hmget(f"{p}:usage", ["items", "bytes"])
            pipe.hgetall(f"{p}:counters")
            pipe.zrange(f"{p}:opens", 0, 0, withscores=True)
            for queue, kind in ready_keys:
                pipe.lindex(f"{p}:ready:{queue}:{kind}", 0)
            pipe.hmget(f"{p}:config", ["group_size", "task_type"])
            replies = await pipe.execute()
        server_time, open_groups = replies[0], replies[1]
        now_ms = server_time[0] * 1000 + server_time[1] // 1000
        k = len(ready_keys)
        ready_counts = replies[2 : 2 + k]
        leased, usage, counters, oldest_open = replies[2 + k : 6 + k]
        heads = replies[6 + k : 6 + 2 * k]
        config = replies[6 + 2 * k]
        ready: dict[str, int] = {}
        for (queue, kind), count in zip(ready_keys, ready_counts, strict=True):
            ready[f"{queue}:{kind}"] = int(count)
        oldest_ready_ms = None
        head_ids = [gid for gid in heads if gid]
        if head_ids:
            async with self.redis.pipeline(transaction=False) as pipe:
                for gid in head_ids:
                    pipe.hget(f"{p}:ginfo:{gid}", "sealed")
                sealed = [int(x) for x in await pipe.execute() if x]
            oldest_ready_ms = min(sealed) if sealed else None
        return BufferStats(
            run_id=run_id,
            open_groups=int(open_groups),
            ready_groups=ready,
            leased_groups=int(leased),
            items=int(usage[0] or 0),
            bytes=int(usage[1] or 0),
            max_items=self.limits.max_items,
            max_bytes=self.limits.max_bytes,
            oldest_ready_age_s=None
            if oldest_ready_ms is None
            else max(0.0, (now_ms - oldest_ready_ms) / 1000),
            longest_open_idle_s=max(0.0, (now_ms - oldest_open[0][1]) / 1000) if oldest_open else None,
            group_size=int(config[0]) if config[0] else self.limits.group_size,
            task_type=config[1],
            totals={name: int(value) for name, value in counters.items()},
        )
