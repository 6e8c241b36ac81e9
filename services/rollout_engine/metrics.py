"""Prometheus metrics of the rollout engine (``slime_rollout_engine_*``), served on ``/metrics``."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, Info

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_ITL_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2.5)

REQUESTS = Counter(
    "slime_rollout_engine_requests_total",
    "Generation requests finished, by finish reason.",
    ["finish_reason"],
)
PROMPT_TOKENS = Counter("slime_rollout_engine_prompt_tokens_total", "Prompt tokens received.")
GENERATION_TOKENS = Counter("slime_rollout_engine_generation_tokens_total", "Tokens generated.")
CACHED_PROMPT_TOKENS = Counter(
    "slime_rollout_engine_cached_prompt_tokens_total",
    "Prompt tokens not prefilled: their keys/values were copied from an identical prompt's in the same batch.",
)
RUNNING = Gauge(
    "slime_rollout_engine_num_running_reqs", "Requests in the running batch (decoding or prefilling)."
)
WAITING = Gauge("slime_rollout_engine_num_waiting_reqs", "Requests queued for admission.")
KV_USAGE = Gauge("slime_rollout_engine_kv_cache_usage", "Fraction of KV-cache token capacity in use.")
TTFT = Histogram(
    "slime_rollout_engine_time_to_first_token_seconds",
    "Arrival to first generated token.",
    buckets=_LATENCY_BUCKETS,
)
ITL = Histogram(
    "slime_rollout_engine_inter_token_latency_seconds",
    "Time between two tokens of one request.",
    buckets=_ITL_BUCKETS,
)
E2E_LATENCY = Histogram(
    "slime_rollout_engine_e2e_request_latency_seconds",
    "Arrival to finish of a request.",
    buckets=_LATENCY_BUCKETS,
)
WEIGHT_VERSION = Info("slime_rollout_engine_weight_version", "Weight version the engine serves.")
MEMORY_OCCUPATION = Counter(
    "slime_rollout_engine_memory_occupation_total",
    "release_memory_occupation / resume_memory_occupation operations, by action and memory tag.",
    ["action", "tag"],
)
WEIGHT_UPDATES = Counter(
    "slime_rollout_engine_weight_updates_total",
    "Weight updates, by source and outcome.",
    ["source", "outcome"],
)
WEIGHT_UPDATE_SECONDS = Histogram(
    "slime_rollout_engine_weight_update_seconds",
    "Duration of successful weight updates, by source (disk, tensor, distributed).",
    ["source"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
