"""The engine health state machine, worker URL validation and weight-version staleness, as pure functions."""

from __future__ import annotations

import pytest

from router.health import HealthConfig, ProbeResult, next_state, transitions
from router.registry import InvalidWorkerUrl, WorkerRecord, WorkerState, is_behind, normalize_worker_url

CONFIG = HealthConfig(interval=1.0, timeout=1.0, first_wait=10.0)
OK = ProbeResult(ok=True, answered=True, weight_version="5")
OK_OLD = ProbeResult(ok=True, answered=True, weight_version="4")
REFUSED = ProbeResult(ok=False, answered=False, error="connection refused")
LOADING = ProbeResult(ok=False, answered=True, error="HTTP 503")


def record(state: WorkerState, since: float = 100.0) -> WorkerRecord:
    return WorkerRecord(url="http://e:1", state=state, state_since=since)


def test_full_cycle_healthy_suspect_dead_restarting_stale_healthy() -> None:
    now = 200.0
    healthy = record(WorkerState.HEALTHY)
    assert transitions(healthy, REFUSED, now, CONFIG, "5") == [WorkerState.SUSPECT]
    # One failure is only a suspicion: the confirming probe makes it DEAD.
    assert transitions(record(WorkerState.SUSPECT), REFUSED, now, CONFIG, "5") == [WorkerState.DEAD]
    assert transitions(record(WorkerState.DEAD), REFUSED, now, CONFIG, "5") == []
    # The engine's process is back but still loading.
    assert transitions(record(WorkerState.DEAD), LOADING, now, CONFIG, "5") == [WorkerState.RESTARTING]
    # Restarted with old weights: STALE, not routable, until it has the published version.
    assert transitions(record(WorkerState.RESTARTING, now), OK_OLD, now, CONFIG, "5") == [WorkerState.STALE]
    assert transitions(record(WorkerState.STALE), OK_OLD, now, CONFIG, "5") == []
    assert transitions(record(WorkerState.STALE), OK, now, CONFIG, "5") == [WorkerState.HEALTHY]


def test_a_dead_engine_that_answers_healthy_goes_through_restarting_in_one_probe() -> None:
    assert transitions(record(WorkerState.DEAD), OK_OLD, 200.0, CONFIG, "5") == [
        WorkerState.RESTARTING,
        WorkerState.STALE,
    ]
    assert transitions(record(WorkerState.DEAD), OK, 200.0, CONFIG, "5") == [
        WorkerState.RESTARTING,
        WorkerState.HEALTHY,
    ]


def test_first_wait_protects_loading_engines() -> None:
    starting = record(WorkerState.STARTING, since=100.0)
    assert next_state(starting, LOADING, 100.0 + 9.9, CONFIG, None) == WorkerState.STARTING
    assert next_state(starting, REFUSED, 100.0 + 10.0, CONFIG, None) == WorkerState.DEAD
    assert next_state(starting, OK, 100.5, CONFIG, None) == WorkerState.HEALTHY
    restarting = record(WorkerState.RESTARTING, since=100.0)
    assert next_state(restarting, LOADING, 105.0, CONFIG, None) == WorkerState.RESTARTING


def test_a_suspect_that_passes_is_healthy_again_and_staleness_follows_the_published_version() -> None:
    assert next_state(record(WorkerState.SUSPECT), OK, 0.0, CONFIG, "5") == WorkerState.HEALTHY
    assert next_state(record(WorkerState.HEALTHY), OK_OLD, 0.0, CONFIG, "5") == WorkerState.STALE
    assert next_state(record(WorkerState.HEALTHY), OK_OLD, 0.0, CONFIG, None) == WorkerState.HEALTHY


def test_no_first_wait_does_not_loop_between_dead_and_restarting() -> None:
    config = HealthConfig(interval=1.0, timeout=1.0, first_wait=0.0)
    assert transitions(record(WorkerState.DEAD), LOADING, 200.0, config, None) == [WorkerState.RESTARTING]
    assert transitions(record(WorkerState.RESTARTING), LOADING, 200.0, config, None) == [WorkerState.DEAD]


def test_is_behind_compares_numbers_and_otherwise_equality() -> None:
    assert is_behind("4", "5")
    assert not is_behind("5", "5")
    assert not is_behind("6", "5")
    assert is_behind("default", "5")
    assert not is_behind("v2", "v2")
    # Unknown versions (no /get_weight_version, or nothing published) never hold a worker back.
    assert not is_behind(None, "5")
    assert not is_behind("1", None)


def test_poll_delays_follow_the_flags() -> None:
    config = HealthConfig(interval=30.0, timeout=30.0, first_wait=300.0)
    assert config.poll_delay(WorkerState.HEALTHY) == 30.0
    assert config.poll_delay(WorkerState.DEAD) == 30.0
    assert config.poll_delay(WorkerState.SUSPECT) == 0.0
    assert config.poll_delay(WorkerState.STARTING) == 2.0
    assert config.poll_delay(WorkerState.STALE) == 1.0


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"interval": 0.0}, "--rollout-health-check-interval must be positive"),
        ({"timeout": -1.0}, "--rollout-health-check-timeout must be positive"),
        ({"first_wait": -1.0}, "--rollout-health-check-first-wait must be >= 0"),
    ],
)
def test_health_config_names_the_bad_flag(flags: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        HealthConfig(**flags)


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        ("http://127.0.0.1:30001", "http://127.0.0.1:30001"),
        ("http://127.0.0.1:30001/", "http://127.0.0.1:30001"),
        (" https://engine-0.svc:8000 ", "https://engine-0.svc:8000"),
        ("http://[::1]:30001", "http://[::1]:30001"),
        ("http://engine", "http://engine"),
    ],
)
def test_worker_urls_are_normalised(given: str, stored: str) -> None:
    assert normalize_worker_url(given) == stored


@pytest.mark.parametrize(
    ("given", "why"),
    [
        ("127.0.0.1:30001", "scheme"),
        ("ftp://host:1", "scheme"),
        ("http://", "no host"),
        ("http://host:notaport", "malformed"),
        ("http://host:99999", "malformed"),
        ("http://host:1/generate", "only scheme, host and port"),
        ("http://host:1?x=1", "only scheme, host and port"),
        ("", "empty"),
    ],
)
def test_malformed_worker_urls_are_rejected_with_the_reason(given: str, why: str) -> None:
    with pytest.raises(InvalidWorkerUrl, match=why):
        normalize_worker_url(given)
