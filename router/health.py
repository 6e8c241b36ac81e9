"""Engine health: the state machine HEALTHY -> SUSPECT -> DEAD -> RESTARTING -> STALE -> HEALTHY and the prober
that drives it with ``/health_generate`` under slime's ``--rollout-health-check-interval/-timeout/-first-wait``.

One replica at a time probes (it holds a lease in the registry); every replica reports the failures it sees on
requests, which makes a worker SUSPECT at once so that the prober confirms or clears it on its next tick.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections import Counter
from dataclasses import dataclass, replace

from redis.exceptions import RedisError

from router import metrics
from router.registry import WorkerRecord, WorkerRegistry, WorkerState, is_behind
from router.workers import WorkerTable
from services.core.upstream import UpstreamError, UpstreamPool

logger = logging.getLogger(__name__)

# How often the prober looks for workers due a probe; SUSPECT workers are confirmed within one tick.
TICK_S = 0.1
# Restarting engines are polled this often at most (slime waits for a new engine's /health_generate every 2 s).
STARTUP_POLL_S = 2.0
# A STALE worker is re-checked at least this often, so that it takes traffic soon after it gets the weights.
STALE_POLL_S = 1.0
LEASE_TTL_S = 2.0


@dataclass(frozen=True)
class HealthConfig:
    """slime's fault-tolerance flags, in seconds."""

    interval: float = 30.0
    timeout: float = 30.0
    first_wait: float = 300.0

    def __post_init__(self) -> None:
        for name in ("interval", "timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--rollout-health-check-{name} must be positive, got {getattr(self, name)}")
        if self.first_wait < 0:
            raise ValueError(f"--rollout-health-check-first-wait must be >= 0, got {self.first_wait}")

    def poll_delay(self, state: WorkerState) -> float:
        """Seconds between the end of one probe of a worker in ``state`` and the start of the next."""
        if state == WorkerState.SUSPECT:
            return 0.0
        if state in (WorkerState.STARTING, WorkerState.RESTARTING):
            return min(self.interval, STARTUP_POLL_S)
        if state == WorkerState.STALE:
            return min(self.interval, STALE_POLL_S)
        return self.interval


@dataclass(frozen=True)
class ProbeResult:
    """One probe: ``ok`` when /health_generate answered 2xx in time; ``answered`` when the worker sent any HTTP
    answer at all (its process is up); the weight version it reported, if it did."""

    ok: bool
    answered: bool
    weight_version: str | None = None
    error: str | None = None


def next_state(
    record: WorkerRecord, probe: ProbeResult, now: float, config: HealthConfig, published: str | None
) -> WorkerState:
    """The state one step after ``record.state`` given ``probe``; equal to it when the probe changes nothing."""
    state = record.state
    if state == WorkerState.DEAD:
        return WorkerState.RESTARTING if probe.answered else WorkerState.DEAD
    if probe.ok:
        return WorkerState.STALE if is_behind(probe.weight_version, published) else WorkerState.HEALTHY
    if state in (WorkerState.STARTING, WorkerState.RESTARTING):
        # Still loading: failures count only once the first-wait grace period is over.
        return WorkerState.DEAD if now - record.state_since >= config.first_wait else state
    if state == WorkerState.SUSPECT:
        return WorkerState.DEAD
    return WorkerState.SUSPECT


def transitions(
    record: WorkerRecord, probe: ProbeResult, now: float, config: HealthConfig, published: str | None
) -> list[WorkerState]:
    """The states ``record`` passes through on ``probe``; empty when it stays where it is. One probe moves one
    step, except that a dead engine that answers healthy again goes on from RESTARTING to STALE or HEALTHY."""
    state = next_state(record, probe, now, config, published)
    if state == record.state:
        return []
    if state == WorkerState.RESTARTING and probe.ok:
        return [
            state,
            next_state(replace(record, state=state, state_since=now), probe, now, config, published),
        ]
    return [state]


class Prober:
    """The HTTP side of health checks, on its own connection pool so that probes never queue behind traffic."""

    def __init__(self, config: HealthConfig) -> None:
        self.config = config
        self.pool = UpstreamPool(connect_timeout=config.timeout)

    async def close(self) -> None:
        await self.pool.close()

    async def get(self, url: str, path: str) -> tuple[int, bytes]:
        """GET ``url + path`` within the health-check timeout: (status, body)."""
        async with asyncio.timeout(self.config.timeout):
            response = await self.pool.request(url, "GET", path, [])
            try:
                return response.status, await response.read()
            finally:
                response.release()

    async def post_json(self, url: str, path: str, body: bytes) -> int:
        async with asyncio.timeout(self.config.timeout):
            response = await self.pool.request(
                url, "POST", path, [(b"content-type", b"application/json")], body
            )
            try:
                await response.read()
                return response.status
            finally:
                response.release()

    async def probe(self, url: str) -> ProbeResult:
        """GET /health_generate, then (if healthy) GET /get_weight_version."""
        try:
            status, _ = await self.get(url, "/health_generate")
        except TimeoutError:
            return ProbeResult(
                False, False, None, f"/health_generate did not answer within {self.config.timeout:g}s"
            )
        except UpstreamError as exc:
            return ProbeResult(False, False, None, f"/health_generate failed: {exc}")
        if status >= 300:
            return ProbeResult(False, True, None, f"/health_generate answered HTTP {status}")
        try:
            version = await self.weight_version(url)
        except (TimeoutError, UpstreamError, ValueError) as exc:
            return ProbeResult(False, True, None, f"/get_weight_version failed: {type(exc).__name__}: {exc}")
        return ProbeResult(True, True, version)

    async def weight_version(self, url: str) -> str | None:
        """The worker's weight version; None when it has no ``/get_weight_version`` (older SGLang)."""
        status, body = await self.get(url, "/get_weight_version")
        if status == 404:
            return None
        if status >= 300:
            raise ValueError(f"HTTP {status}")
        payload = json.loads(body)
        version = payload.get("weight_version") if isinstance(payload, dict) else None
        return None if version is None else str(version)


class HealthMonitor:
    """Drives every worker's state: periodic probes (by the lease holder), request failures, weight versions."""

    def __init__(self, registry: WorkerRegistry, table: WorkerTable, config: HealthConfig) -> None:
        self.registry = registry
        self.table = table
        self.config = config
        self.prober = Prober(config)
        self.owner = uuid.uuid4().hex
        self.is_leader = False
        self._running = False
        self._last_probe: dict[str, float] = {}
        self._probing: set[str] = set()
        self._tasks: set[asyncio.Task] = set()
        # Request errors are counted here and written in batches: one Redis write per failed request would
        # flood the registry exactly when workers fail.
        self._unsaved_errors: Counter[str] = Counter()
        self._last_errors: dict[str, str] = {}

    def stop(self) -> None:
        """End ``run`` after its current tick (cancellation alone can be swallowed by a client library)."""
        self._running = False

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=2.0)
        await self.prober.close()

    async def run(self) -> None:
        """Hold the prober lease when free and probe every worker that is due, until ``stop``."""
        self._running = True
        while self._running:
            try:
                leader = await self.registry.hold_prober_lease(self.owner, LEASE_TTL_S)
            except RedisError as exc:
                logger.warning("cannot reach the registry to renew the prober lease: %s", exc)
                leader = False
            if leader != self.is_leader:
                logger.info("this replica %s probing the workers", "is now" if leader else "stopped")
                self.is_leader = leader
            if leader:
                now = time.monotonic()
                for url, record in list(self.table.records.items()):
                    due = self._last_probe.get(url, float("-inf")) + self.config.poll_delay(record.state)
                    if url not in self._probing and now >= due:
                        self._spawn(self.probe_and_apply(url))
            await asyncio.sleep(TICK_S)

    async def probe_and_apply(self, url: str) -> WorkerRecord | None:
        """Probe ``url`` once and write the resulting state; the new record (None if it was removed)."""
        if url in self._probing:
            return self.table.records.get(url)
        self._probing.add(url)
        try:
            result = await self.prober.probe(url)
            return await self._apply(url, result)
        finally:
            self._last_probe[url] = time.monotonic()
            self._probing.discard(url)

    async def _apply(self, url: str, result: ProbeResult) -> WorkerRecord | None:
        record = self.table.records.get(url)
        if record is None:
            return None
        now = time.time()
        path = transitions(record, result, now, self.config, self.table.weight_version)
        patch: dict[str, object] = {}
        incr: dict[str, int] = {}
        if result.ok:
            patch.update(weight_version=result.weight_version, consecutive_failures=0, last_ok_at=now)
        else:
            metrics.ERRORS.labels(url, "probe").inc()
            patch["last_error"] = result.error
            incr = {"consecutive_failures": 1, "errors_total": 1}
        if path:
            patch.update(state=path[-1].value, state_since=now)
        try:
            updated = await self.registry.update(url, patch, expect=[record.state], incr=incr)
        except RedisError as exc:
            logger.warning("cannot record the probe of %s in the registry: %s", url, exc)
            return record
        if updated is None:
            # Someone else changed or removed the worker meanwhile; the next sync brings their version.
            return self.table.records.get(url)
        if path:
            chain = " -> ".join(state.value for state in [record.state, *path])
            log = logger.warning if path[-1] in (WorkerState.SUSPECT, WorkerState.DEAD) else logger.info
            log("worker %s: %s%s", url, chain, f" ({result.error})" if result.error else "")
        self.table.put(updated)
        return updated

    def report_failure(self, url: str, kind: str, message: str, *, suspect: bool) -> None:
        """A request to ``url`` failed. With ``suspect`` (the connection was refused or dropped: the process may
        be gone) stop routing to it now and let the prober confirm; a timeout alone proves nothing (an engine
        can be busy) and is left to the probes, so that overload does not cascade into every worker SUSPECT."""
        metrics.ERRORS.labels(url, kind).inc()
        self._unsaved_errors[url] += 1
        self._last_errors[url] = message
        record = self.table.records.get(url)
        if not suspect or record is None or record.state not in (WorkerState.HEALTHY, WorkerState.STALE):
            return
        logger.warning("worker %s: %s -> SUSPECT (%s)", url, record.state.value, message)
        self.table.put(
            replace(record, state=WorkerState.SUSPECT, state_since=time.time(), last_error=message)
        )
        self._spawn(self._persist_suspect(url, message))

    async def _persist_suspect(self, url: str, message: str) -> None:
        patch = {"state": WorkerState.SUSPECT.value, "state_since": time.time(), "last_error": message}
        try:
            await self.registry.update(url, patch, expect=[WorkerState.HEALTHY, WorkerState.STALE])
        except RedisError as exc:
            logger.warning("cannot record that %s is SUSPECT in the registry: %s", url, exc)

    async def save_errors(self) -> None:
        """Add the request errors seen since the last call to the registry's counts, one write per worker."""
        unsaved, self._unsaved_errors = self._unsaved_errors, Counter()
        for url, count in unsaved.items():
            try:
                await self.registry.update(
                    url, {"last_error": self._last_errors.pop(url, None)}, incr={"errors_total": count}
                )
            except RedisError as exc:
                logger.warning("cannot record the errors of %s in the registry: %s", url, exc)
                self._unsaved_errors[url] += count

    async def refresh_versions(self) -> None:
        """Re-read every serving worker's weight version (after a publish): behind -> STALE, caught up -> HEALTHY."""
        urls = [
            url
            for url, record in self.table.records.items()
            if record.state in (WorkerState.HEALTHY, WorkerState.STALE)
        ]
        await asyncio.gather(*(self._refresh_version(url) for url in urls))

    async def _refresh_version(self, url: str) -> None:
        try:
            version = await self.prober.weight_version(url)
        except (TimeoutError, UpstreamError, ValueError) as exc:
            logger.warning("cannot read the weight version of %s: %s", url, exc)
            return
        record = self.table.records.get(url)
        if record is None or record.state not in (WorkerState.HEALTHY, WorkerState.STALE):
            return
        behind = is_behind(version, self.table.weight_version)
        state = WorkerState.STALE if behind else WorkerState.HEALTHY
        patch: dict[str, object] = {"weight_version": version}
        if state != record.state:
            patch.update(state=state.value, state_since=time.time())
            logger.info(
                "worker %s: %s -> %s (weight version %s, published %s)",
                url,
                record.state.value,
                state.value,
                version,
                self.table.weight_version,
            )
        updated = await self.registry.update(url, patch, expect=[record.state])
        if updated is not None:
            self.table.put(updated)

    def forget(self, url: str) -> None:
        self._last_probe.pop(url, None)

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
