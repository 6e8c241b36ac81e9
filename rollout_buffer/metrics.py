"""Prometheus metrics of the rollout buffer (prefix ``slime_rollout_buffer_``), served on ``/metrics``.

Counters count what this process did; the gauges mirror the run-wide state in Redis, refreshed periodically.
"""

from __future__ import annotations

import functools

from prometheus_client import Counter, Gauge
from prometheus_client.metrics import MetricWrapperBase

WRITES = Counter(
    "slime_rollout_buffer_writes_total", "Items newly stored, by where they came from.", ["source"]
)
DUPLICATES = Counter(
    "slime_rollout_buffer_duplicates_total",
    "Items not stored again because their uid (or their task's group) was already stored.",
    ["source"],
)
REJECTED = Counter(
    "slime_rollout_buffer_rejected_total",
    "Requests or items refused, by reason (malformed_json, invalid_field, full, too_large, unauthorized, bad_task).",
    ["reason"],
)
GROUPS_SEALED = Counter("slime_rollout_buffer_groups_sealed_total", "Groups that became complete.")
LEASES = Counter("slime_rollout_buffer_leases_total", "Groups leased to a reader, by API.", ["api"])
LEASES_EXPIRED = Counter(
    "slime_rollout_buffer_leases_expired_total", "Leased groups returned to the buffer unacknowledged."
)
ACKS = Counter("slime_rollout_buffer_acks_total", "Groups acknowledged (and deleted), by API.", ["api"])
EXPIRED_GROUPS = Counter(
    "slime_rollout_buffer_expired_groups_total",
    "Open groups that hit the group timeout, by what happened to them (dropped or delivered partial).",
    ["action"],
)
WORKER_TASKS = Counter(
    "slime_rollout_buffer_worker_tasks_total",
    "Rollout tasks finished by this process's workers, by outcome (stored, duplicate, failed, bad_task).",
    ["outcome"],
)
WORKER_RECLAIMED = Counter(
    "slime_rollout_buffer_worker_reclaimed_total", "Tasks taken over from a silent (dead) worker."
)
QUEUE_DEPTH = Gauge(
    "slime_rollout_buffer_queue_depth",
    "Run-wide queue depths: groups open/ready/leased, tasks queued (unread) and pending (read, not acked).",
    ["run", "state"],
)
HELD = Gauge("slime_rollout_buffer_held", "Items and bytes held until acknowledged.", ["run", "unit"])
LAG = Gauge(
    "slime_rollout_buffer_oldest_ready_age_seconds",
    "Age of the oldest complete group nobody has leased yet (how far readers lag behind).",
    ["run"],
)


@functools.cache
def child(metric: MetricWrapperBase, *labels: str) -> MetricWrapperBase:
    """``metric.labels(*labels)``, looked up once: the write path counts every request."""
    return metric.labels(*labels)
