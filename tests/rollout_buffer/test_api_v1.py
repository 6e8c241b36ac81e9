"""The versioned API over real HTTP: batches with per-item results, lease/ack, stats, bad input, auth, 429."""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from rollout_buffer.server import BufferConfig
from tests.rollout_buffer.helpers import ServedBuffer, serve, trajectory


def _stats(buffer: ServedBuffer) -> dict[str, Any]:
    response = buffer.http.get("/v1/stats")
    response.raise_for_status()
    return response.json()


def _metric(buffer: ServedBuffer, name: str, **labels: str) -> float:
    text = buffer.http.get("/metrics").text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def test_batch_write_reports_each_item_and_is_idempotent(buffer: ServedBuffer) -> None:
    items = [trajectory("a", "g1"), trajectory("b", "g1"), trajectory("c", 2)]
    first = buffer.http.post("/v1/trajectories", json={"items": items})
    assert first.status_code == 200
    body = first.json()
    assert (body["stored"], body["duplicates"], body["sealed_groups"]) == (3, 0, 1)
    assert [r["status"] for r in body["results"]] == ["stored"] * 3
    assert body["results"][2]["instance_id"] == 2

    retry = buffer.http.post("/v1/trajectories", json={"items": [items[2], trajectory("d", 2)]}).json()
    assert [r["status"] for r in retry["results"]] == ["duplicate", "stored"]
    stats = _stats(buffer)
    assert stats["groups_complete"] == 2 and stats["groups_incomplete"] == 0 and stats["items_held"] == 4
    assert stats["totals"]["duplicates"] == 1


def test_lease_then_ack_with_stale_leases_reported(buffer: ServedBuffer) -> None:
    buffer.http.post("/v1/trajectories", json={"items": [trajectory("a", "g"), trajectory("b", "g")]})
    leased = buffer.http.post("/v1/groups/lease", json={"max_groups": 5, "lease_seconds": 30}).json()
    [group] = leased["groups"]
    assert group["kind"] == "trajectory" and group["instance_id"] == "g"
    assert [item["uid"] for item in group["items"]] == ["a", "b"]
    assert buffer.http.post("/v1/groups/lease", json={"max_groups": 5}).json()["groups"] == []

    ack = buffer.http.post("/v1/groups/ack", json={"lease_ids": [group["lease_id"], "9.9"]}).json()
    assert ack["acked"] == 1 and ack["stale"] == ["9.9"]
    assert _stats(buffer)["items_held"] == 0
    assert _metric(buffer, "slime_rollout_buffer_acks_total", api="v1") >= 1


def test_a_group_size_in_the_batch_overrides_the_run_default(buffer: ServedBuffer) -> None:
    body = {"items": [trajectory(u, "g") for u in "abc"], "group_size": 3}
    assert buffer.http.post("/v1/trajectories", json=body).json()["sealed_groups"] == 1


GOOD = trajectory("u", "g")


def _without(key: str) -> dict[str, Any]:
    item = copy.deepcopy(GOOD)
    del item[key]
    return item


def _with(**changes: Any) -> dict[str, Any]:
    return {**copy.deepcopy(GOOD), **changes}


BAD_ITEMS = [
    (_without("uid"), "uid"),
    (_without("instance_id"), "instance_id"),
    (_with(uid=12), "uid"),
    (_with(uid=""), "uid"),
    (_with(instance_id=None), "instance_id"),
    (_with(instance_id=[1]), "instance_id"),
    (_with(reward="1.0"), "reward"),
    (_with(reward=True), "reward"),
    (_with(reward=None), "reward"),
    (_with(messages="hello"), "messages"),
    (_with(messages=[]), "messages"),
    (_with(messages=[{"role": "user"}]), "messages.0.content"),
    (_with(messages=[{"content": "hi"}]), "messages.0.role"),
    (_with(messages=["hi"]), "messages.0"),
    (_with(extra_info=[1]), "extra_info"),
]


def test_bad_items_get_422_naming_the_field_and_nothing_is_stored(buffer: ServedBuffer) -> None:
    for item, field in BAD_ITEMS:
        single = buffer.http.post("/buffer/write", json=item)
        assert single.status_code == 422, (field, single.text)
        assert single.json()["error"]["field"] == field
        assert field in single.json()["error"]["message"]

        batch = buffer.http.post("/v1/trajectories", json={"items": [trajectory("ok", "g"), item]})
        assert batch.status_code == 422, (field, batch.text)
        assert batch.json()["error"]["field"] == f"items.1.{field}"
    assert _stats(buffer)["totals"].get("written", 0) == 0


def test_malformed_and_oversized_bodies(buffer: ServedBuffer) -> None:
    for path in ("/buffer/write", "/v1/trajectories", "/v1/groups/ack", "/start_rollout"):
        response = buffer.http.post(
            path, content=b'{"uid": "a", ', headers={"content-type": "application/json"}
        )
        assert response.status_code == 422, path
        assert response.json()["error"]["field"] == "body"
        assert "malformed JSON" in response.json()["error"]["message"]
    not_object = buffer.http.post("/buffer/write", json=[GOOD])
    assert not_object.status_code == 422 and not_object.json()["error"]["field"] == "body"

    huge = _with(extra_info={"blob": "x" * (80 << 10)})
    too_large = buffer.http.post("/buffer/write", json=huge)
    assert too_large.status_code == 413 and too_large.json()["error"]["field"] == "body"
    assert _stats(buffer)["totals"].get("written", 0) == 0
    assert _metric(buffer, "slime_rollout_buffer_rejected_total", reason="too_large") >= 1
    assert _metric(buffer, "slime_rollout_buffer_rejected_total", reason="malformed_json") >= 4


def test_a_full_buffer_answers_429_with_retry_after_and_stores_nothing(buffer: ServedBuffer) -> None:
    refused_before = _metric(buffer, "slime_rollout_buffer_rejected_total", reason="full")
    items = [trajectory(f"u{i}", f"g{i // 2}") for i in range(50)]
    assert buffer.http.post("/v1/trajectories", json={"items": items}).status_code == 200
    over = buffer.http.post("/v1/trajectories", json={"items": [trajectory("x", "h"), trajectory("y", "h")]})
    assert over.status_code == 429
    assert over.headers["retry-after"] == "1"
    assert "full" in over.json()["error"]["message"]
    single = buffer.http.post("/buffer/write", json=trajectory("x", "h"))
    assert single.status_code == 429
    assert _stats(buffer)["items_held"] == 50
    assert _metric(buffer, "slime_rollout_buffer_rejected_total", reason="full") - refused_before == 3

    leased = buffer.http.post("/v1/groups/lease", json={"max_groups": 1}).json()["groups"]
    buffer.http.post("/v1/groups/ack", json={"lease_ids": [leased[0]["lease_id"]]})
    assert buffer.http.post("/buffer/write", json=trajectory("x", "h")).status_code == 200


def test_bearer_token_guards_writes_and_reads(buffer_config: BufferConfig) -> None:
    with serve(replace(buffer_config, auth_token="s3cret")) as buffer:
        assert buffer.http.get("/health").status_code == 200
        for method, path in (("POST", "/buffer/write"), ("POST", "/get_rollout_data"), ("GET", "/v1/stats")):
            missing = buffer.http.request(method, path, json=GOOD)
            assert missing.status_code == 401, path
            wrong = buffer.http.request(method, path, json=GOOD, headers={"Authorization": "Bearer nope"})
            assert wrong.status_code == 401, path
        ok = buffer.http.post("/buffer/write", json=GOOD, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        assert _metric(buffer, "slime_rollout_buffer_rejected_total", reason="unauthorized") >= 6


def test_runs_are_namespaced_and_bad_run_ids_are_named(buffer: ServedBuffer) -> None:
    body = {"items": [trajectory("a", "g"), trajectory("b", "g")], "run_id": "other-run"}
    assert buffer.http.post("/v1/trajectories", json=body).status_code == 200
    assert _stats(buffer)["groups_complete"] == 0
    assert buffer.http.get("/v1/stats", params={"run_id": "other-run"}).json()["groups_complete"] == 1
    bad = buffer.http.post("/v1/groups/lease", json={"run_id": "a:b"})
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "run_id"
    info = buffer.http.get("/v1/info").json()
    assert info["grpc_port"] == int(buffer.grpc_addr.rsplit(":", 1)[1])
