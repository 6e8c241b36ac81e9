"""This replica's view of the workers: the registry's records (refreshed from Redis), which of them may take
traffic, and the replica's own per-worker counters (in flight, requests, retries). The request path reads only
this in-memory view, never Redis."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable

from router import metrics
from router.registry import RegistrySnapshot, WorkerRecord, WorkerState, is_behind

logger = logging.getLogger(__name__)

# Called with the URL of a worker that was removed or declared DEAD: its in-flight requests must move elsewhere.
LostCallback = Callable[[str], None]


class WorkerTable:
    """Records by URL, the routable (HEALTHY) URLs, and a change signal that waiting requests can block on."""

    def __init__(self) -> None:
        self.records: dict[str, WorkerRecord] = {}
        self.weight_version: str | None = None
        self.routable: list[str] = []
        self.load: Counter[str] = Counter()
        self.requests: Counter[str] = Counter()
        self.retries: Counter[str] = Counter()
        self._on_lost: list[LostCallback] = []
        self._changed = asyncio.Event()

    def on_lost(self, callback: LostCallback) -> None:
        self._on_lost.append(callback)

    def replace_all(self, snapshot: RegistrySnapshot) -> None:
        """Adopt the registry's records; fire the change signal and lost-worker callbacks for what differs."""
        changed = snapshot.weight_version != self.weight_version
        self.weight_version = snapshot.weight_version
        for url in [url for url in self.records if url not in snapshot.workers]:
            changed = True
            self._forget(url)
        for record in snapshot.workers.values():
            changed = self._store(record) or changed
        if changed:
            self._refresh()

    def put(self, record: WorkerRecord) -> None:
        """Adopt one record that this replica has just written to the registry."""
        if self._store(record):
            self._refresh()

    def drop(self, url: str) -> None:
        if url in self.records:
            self._forget(url)
            self._refresh()

    def set_weight_version(self, version: str) -> None:
        if version != self.weight_version:
            self.weight_version = version
            self._refresh()

    def state_of(self, url: str) -> WorkerState | None:
        record = self.records.get(url)
        return None if record is None else record.state

    async def wait_changed(self, timeout: float) -> bool:
        """Wait until the table changes or ``timeout`` passes; True on a change."""
        event = self._changed
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def why_unroutable(self) -> str:
        """A sentence for the 503 answer: why no worker can take a request right now."""
        if not self.records:
            return "no workers are registered (POST /add_worker?url=...)"
        parts = []
        for url, record in sorted(self.records.items()):
            detail = record.state.value
            if record.state == WorkerState.STALE:
                detail += f" (weight version {record.weight_version} < published {self.weight_version})"
            elif record.last_error and record.state != WorkerState.HEALTHY:
                detail += f" ({record.last_error})"
            parts.append(f"{url}: {detail}")
        return "no HEALTHY worker: " + "; ".join(parts)

    def _store(self, record: WorkerRecord) -> bool:
        old = self.records.get(record.url)
        if old == record:
            return False
        self.records[record.url] = record
        if old is None or old.state != record.state:
            if old is not None:
                logger.debug("worker %s: %s -> %s", record.url, old.state.value, record.state.value)
            metrics.set_state(record.url, record.state)
            if record.state == WorkerState.DEAD:
                self._lost(record.url)
        return True

    def _forget(self, url: str) -> None:
        del self.records[url]
        logger.info("worker %s removed", url)
        self._lost(url)
        metrics.forget_worker(url)
        self.requests.pop(url, None)
        self.retries.pop(url, None)

    def _lost(self, url: str) -> None:
        for callback in self._on_lost:
            callback(url)

    def _refresh(self) -> None:
        # A HEALTHY record whose version lags a just-published one stops taking traffic at once, before any probe.
        self.routable = [
            url
            for url, record in self.records.items()
            if record.state == WorkerState.HEALTHY
            and not is_behind(record.weight_version, self.weight_version)
        ]
        self._changed.set()
        self._changed = asyncio.Event()
