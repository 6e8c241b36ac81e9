"""The worker registry: each worker's URL, health state and weight version, plus the version the trainer last
published. Kept in Redis so that a restarted router, and every router replica, sees the same workers and states.

Redis layout (all under the run id, see ``services.core.redis_util.key``): the hash ``slime:<run>:router:workers``
maps a worker URL to its record as JSON; ``slime:<run>:weight_version`` holds the published weight version;
``slime:<run>:router:prober`` is the lease of the one replica that probes the workers.
"""

from __future__ import annotations

import json
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from typing import Any
from urllib.parse import urlsplit

from services.core.redis_util import key, redis_from_url

logger = logging.getLogger(__name__)


class WorkerState(StrEnum):
    """Where a worker is in its life; only HEALTHY workers get traffic.

    STARTING (just registered) and RESTARTING (was DEAD, is coming back) are given the first-wait grace period
    before failing probes count; HEALTHY -> SUSPECT on one failure, SUSPECT -> DEAD when the confirming probe
    fails too; STALE: healthy but behind the published weight version.
    """

    STARTING = "STARTING"
    HEALTHY = "HEALTHY"
    SUSPECT = "SUSPECT"
    DEAD = "DEAD"
    RESTARTING = "RESTARTING"
    STALE = "STALE"


class InvalidWorkerUrl(ValueError):
    """A worker URL that is not ``http(s)://host[:port]``."""


def normalize_worker_url(url: str) -> str:
    """``url`` as the registry stores it (``scheme://host[:port]``, no trailing slash), or InvalidWorkerUrl."""
    if not isinstance(url, str) or not url.strip():
        raise InvalidWorkerUrl("empty worker URL: expected http://host:port")
    text = url.strip()
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise InvalidWorkerUrl(f"malformed worker URL {text!r}: {exc}; expected http://host:port") from exc
    if parts.scheme not in ("http", "https"):
        raise InvalidWorkerUrl(
            f"malformed worker URL {text!r}: the scheme must be http or https (http://host:port)"
        )
    if not parts.hostname:
        raise InvalidWorkerUrl(f"malformed worker URL {text!r}: no host; expected http://host:port")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username or parts.password:
        raise InvalidWorkerUrl(
            f"malformed worker URL {text!r}: only scheme, host and port are allowed (http://host:port)"
        )
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{parts.scheme}://{host}" + (f":{port}" if port is not None else "")


def is_behind(worker_version: str | None, published: str | None) -> bool:
    """Whether a worker reporting ``worker_version`` lacks the published weights.

    Numeric versions compare as numbers, anything else by equality; a worker that cannot report its version
    (an engine without ``/get_weight_version``) is never held back on that account.
    """
    if published is None or worker_version is None:
        return False
    try:
        return int(worker_version) < int(published)
    except ValueError:
        return worker_version != published


@dataclass(frozen=True)
class WorkerRecord:
    """What every router replica knows about one worker. Times are wall-clock seconds, comparable across hosts."""

    url: str
    state: WorkerState = WorkerState.STARTING
    state_since: float = 0.0
    added_at: float = 0.0
    weight_version: str | None = None
    consecutive_failures: int = 0
    errors_total: int = 0
    last_error: str | None = None
    last_ok_at: float | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> WorkerRecord:
        data = json.loads(text)
        data["state"] = WorkerState(data["state"])
        if data.get("weight_version") is not None:
            data["weight_version"] = str(data["weight_version"])
        known = cls.__dataclass_fields__
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class RegistrySnapshot:
    workers: dict[str, WorkerRecord] = field(default_factory=dict)
    weight_version: str | None = None


def _patched(record: WorkerRecord, patch: Mapping[str, Any], incr: Mapping[str, int]) -> WorkerRecord:
    values = dict(patch)
    for name, step in incr.items():
        values[name] = getattr(record, name) + step
    if "state" in values:
        values["state"] = WorkerState(values["state"])
    return replace(record, **values)


class WorkerRegistry(ABC):
    """Storage of worker records; every state change is a compare-and-set on the current state."""

    @abstractmethod
    async def snapshot(self) -> RegistrySnapshot:
        """All workers and the published weight version, read together."""

    @abstractmethod
    async def add(self, url: str) -> tuple[WorkerRecord, bool]:
        """Register ``url`` (STARTING) unless known; a known DEAD worker becomes RESTARTING. (record, created)."""

    @abstractmethod
    async def remove(self, url: str) -> bool:
        """Forget ``url``; False when it was not registered."""

    @abstractmethod
    async def update(
        self,
        url: str,
        patch: Mapping[str, Any],
        *,
        expect: Collection[WorkerState] = (),
        incr: Mapping[str, int] | None = None,
    ) -> WorkerRecord | None:
        """Apply ``patch`` (and add ``incr`` to counters) if the worker exists and, with ``expect``, its state
        is one of them; the new record, or None when nothing was written."""

    @abstractmethod
    async def publish_weight_version(self, version: str) -> None:
        """Store the weight version the trainer has published."""

    @abstractmethod
    async def hold_prober_lease(self, owner: str, ttl_s: float) -> bool:
        """Take or renew the lease that makes ``owner`` the one replica probing workers; True while held."""

    async def close(self) -> None:  # noqa: B027 - only the Redis registry holds connections
        """Release connections."""


def new_record(url: str, now: float | None = None) -> WorkerRecord:
    now = time.time() if now is None else now
    return WorkerRecord(url=url, state=WorkerState.STARTING, state_since=now, added_at=now)


class MemoryRegistry(WorkerRegistry):
    """The registry of a single router process with no Redis: lost when the process ends."""

    def __init__(self) -> None:
        self._workers: dict[str, WorkerRecord] = {}
        self._version: str | None = None

    async def snapshot(self) -> RegistrySnapshot:
        return RegistrySnapshot(dict(self._workers), self._version)

    async def add(self, url: str) -> tuple[WorkerRecord, bool]:
        current = self._workers.get(url)
        if current is None:
            self._workers[url] = new_record(url)
            return self._workers[url], True
        if current.state == WorkerState.DEAD:
            self._workers[url] = replace(current, state=WorkerState.RESTARTING, state_since=time.time())
        return self._workers[url], False

    async def remove(self, url: str) -> bool:
        return self._workers.pop(url, None) is not None

    async def update(
        self,
        url: str,
        patch: Mapping[str, Any],
        *,
        expect: Collection[WorkerState] = (),
        incr: Mapping[str, int] | None = None,
    ) -> WorkerRecord | None:
        current = self._workers.get(url)
        if current is None or (expect and current.state not in expect):
            return None
        self._workers[url] = _patched(current, patch, incr or {})
        return self._workers[url]

    async def publish_weight_version(self, version: str) -> None:
        self._version = version

    async def hold_prober_lease(self, owner: str, ttl_s: float) -> bool:
        return True


# Compare-and-set of one worker's JSON record: ARGV = url, allowed states (JSON list, empty = any),
# patch (JSON object), increments (JSON object). Returns the new record or false.
_UPDATE_LUA = """
local current = redis.call('HGET', KEYS[1], ARGV[1])
if not current then return false end
local record = cjson.decode(current)
local allowed = cjson.decode(ARGV[2])
if #allowed > 0 then
  local ok = false
  for _, state in ipairs(allowed) do
    if record['state'] == state then ok = true end
  end
  if not ok then return false end
end
for name, value in pairs(cjson.decode(ARGV[3])) do record[name] = value end
for name, step in pairs(cjson.decode(ARGV[4])) do record[name] = (tonumber(record[name]) or 0) + step end
local text = cjson.encode(record)
redis.call('HSET', KEYS[1], ARGV[1], text)
return text
"""

_LEASE_LUA = """
local holder = redis.call('GET', KEYS[1])
if holder == false or holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""


class RedisRegistry(WorkerRegistry):
    """The registry in Redis, shared by every router replica of the run."""

    def __init__(self, redis_url: str, run_id: str) -> None:
        self._redis = redis_from_url(redis_url)
        self._workers_key = key(run_id, "router", "workers")
        self._version_key = key(run_id, "weight_version")
        self._lease_key = key(run_id, "router", "prober")
        self._update = self._redis.register_script(_UPDATE_LUA)
        self._lease = self._redis.register_script(_LEASE_LUA)

    async def snapshot(self) -> RegistrySnapshot:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hgetall(self._workers_key)
            pipe.get(self._version_key)
            raw, version = await pipe.execute()
        workers: dict[str, WorkerRecord] = {}
        for url, text in raw.items():
            try:
                workers[url] = WorkerRecord.from_json(text)
            except (ValueError, TypeError, KeyError) as exc:
                logger.error("ignoring unreadable registry record for %s: %s", url, exc)
        return RegistrySnapshot(workers, version)

    async def add(self, url: str) -> tuple[WorkerRecord, bool]:
        record = new_record(url)
        if await self._redis.hsetnx(self._workers_key, url, record.to_json()):
            return record, True
        restarted = await self.update(
            url,
            {"state": WorkerState.RESTARTING.value, "state_since": time.time()},
            expect=[WorkerState.DEAD],
        )
        if restarted is not None:
            return restarted, False
        text = await self._redis.hget(self._workers_key, url)
        if text is None:
            # Removed between the two calls: register it afresh.
            return await self.add(url)
        return WorkerRecord.from_json(text), False

    async def remove(self, url: str) -> bool:
        return bool(await self._redis.hdel(self._workers_key, url))

    async def update(
        self,
        url: str,
        patch: Mapping[str, Any],
        *,
        expect: Collection[WorkerState] = (),
        incr: Mapping[str, int] | None = None,
    ) -> WorkerRecord | None:
        text = await self._update(
            keys=[self._workers_key],
            args=[
                url,
                json.dumps([str(state) for state in expect]),
                # cjson turns an empty JSON object into an empty table, which it would re-encode as []; a dummy
                # key keeps the patch an object even when empty.
                json.dumps({str(k): (str(v) if isinstance(v, WorkerState) else v) for k, v in patch.items()})
                if patch
                else '{"url":' + json.dumps(url) + "}",
                json.dumps(dict(incr)) if incr else '{"errors_total":0}',
            ],
        )
        return None if text is None else WorkerRecord.from_json(text)

    async def publish_weight_version(self, version: str) -> None:
        await self._redis.set(self._version_key, version)

    async def hold_prober_lease(self, owner: str, ttl_s: float) -> bool:
        return bool(await self._lease(keys=[self._lease_key], args=[owner, max(1, round(ttl_s * 1000))]))

    async def close(self) -> None:
        await self._redis.aclose()
