"""slime's endpoints driven the way slime's ``rollout_buffer_example.py`` and its generators drive them."""

from __future__ import annotations

import asyncio
import textwrap
import time
from pathlib import Path

import httpx
import pytest

from rollout_buffer.arguments import parse_args
from rollout_buffer.client import BufferClient, start_rollout_payload
from rollout_buffer.generators import GeneratorError, GeneratorRegistry
from rollout_buffer.server import BufferConfig
from tests.rollout_buffer.helpers import ServedBuffer, serve, trajectory

# A generator in slime's contract: posts one item per sample to the buffer with plain HTTP, like slime's
# BaseGenerator; instance 2 gets an empty answer, which its is_valid_group refuses.
GENERATOR = textwrap.dedent(
    """
    import time
    from pathlib import Path

    import httpx

    TASK_TYPE = "toy"

    def run_rollout(data):
        url = data["remote_buffer_url"].rstrip("/") + "/buffer/write"
        n = int(data["num_repeat_per_sample"])
        skip = list(data.get("skip_instance_ids") or [])
        with httpx.Client(trust_env=False) as client:
            for instance_id in range(3):
                if instance_id in skip:
                    continue
                for k in range(n):
                    answer = "" if instance_id == 2 and k == 0 else str(k)
                    item = {
                        "uid": f"{instance_id}-{k}",
                        "instance_id": instance_id,
                        "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": answer}],
                        "reward": float(k),
                        "extra_info": {"timestamp": str(time.time()), "finish_reason": "stop"},
                    }
                    client.post(url, json=item).raise_for_status()
        release = Path(data["input_file"]).with_suffix(".done")
        while not release.exists():
            time.sleep(0.01)

    def is_valid_group(group, min_valid_group_size, task_type):
        instance_id, items = group
        return len(items) >= min_valid_group_size and all(i["messages"][-1]["content"] for i in items)

    def transform_group(group, task_type):
        instance_id, items = group
        for item in items:
            item["extra_info"]["transformed_for"] = task_type
        return instance_id, items

    def get_group_data_meta_info(temp_data):
        return {"total_samples": sum(len(v) for v in temp_data.values()), "custom": True}
    """
)

REQUIRED_KEYS = {"uid", "instance_id", "messages", "reward", "extra_info"}


@pytest.fixture
def generator_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "generator"
    directory.mkdir()
    (directory / "toy_generator.py").write_text(GENERATOR)
    (directory / "helpers.py").write_text("VALUE = 1\n")
    return directory


def _slime_payload(buffer_url: str, input_file: Path) -> dict:
    # What slime's start_rollout() sends: every number as a string.
    return {
        "num_process": "100",
        "num_epoch": "3",
        "remote_engine_url": "http://127.0.0.1:1",
        "remote_buffer_url": buffer_url,
        "task_type": "toy",
        "input_file": str(input_file),
        "num_repeat_per_sample": "3",
        "max_tokens": "64",
        "sampling_params": {"max_tokens": 64, "temperature": 1.0, "top_p": 1.0},
        "tokenizer_path": "unused",
        "skip_instance_ids": [],
    }


def _get_rollout_data(http: httpx.Client, timeout: float = 10.0) -> tuple[list[dict], dict]:
    """slime's get_rollout_data(): poll until success, then check every item has the required keys."""
    deadline = time.monotonic() + timeout
    while True:
        response = http.post("/get_rollout_data", json={}, timeout=120)
        response.raise_for_status()
        body = response.json()
        if body["success"]:
            break
        assert time.monotonic() < deadline, f"no rollout data within {timeout}s: {body}"
        time.sleep(0.05)
    data = body["data"]
    for item in data["data"]:
        assert item.keys() >= REQUIRED_KEYS
    return data["data"], data["meta_info"]


def test_start_rollout_then_read_complete_groups_like_slime(
    buffer_config: BufferConfig, generator_dir: Path, tmp_path: Path
) -> None:
    buffer_config.registry = GeneratorRegistry.discover([generator_dir], [])
    buffer_config.settings.task_type = "toy"
    input_file = tmp_path / "prompts.jsonl"
    with serve(buffer_config) as buffer:
        payload = _slime_payload(buffer.url, input_file)
        assert buffer.http.post("/start_rollout", json=payload).json() == {"message": "Rollout started"}
        # slime's trainer retries /start_rollout; a second call must not start a second generator.
        args = parse_args(
            ["--rollout-buffer-url", buffer.url, "--rollout-task-type", "toy", "--n-samples-per-prompt", "3"]
        )
        assert start_rollout_payload(args)["num_repeat_per_sample"] == "3"

        async def start_again() -> str:
            client = BufferClient.from_args(args)
            try:
                return await client.start_rollout(args)
            finally:
                await client.aclose()

        assert asyncio.run(start_again()) == "Rollout already running"

        items, meta = _get_rollout_data(buffer.http)
        deadline = time.monotonic() + 10
        while len(items) < 6:
            assert time.monotonic() < deadline
            more, _ = _get_rollout_data(buffer.http)
            items += more
        input_file.with_suffix(".done").touch()

        groups: dict[int, list[dict]] = {}
        for item in items:
            groups.setdefault(item["instance_id"], []).append(item)
        # num_repeat_per_sample (3) is the group size; group 2 never satisfies is_valid_group.
        assert sorted(groups) == [0, 1]
        assert all(len(group) == 3 for group in groups.values())
        assert all(item["extra_info"]["transformed_for"] == "toy" for item in items)
        assert meta["custom"] is True and set(meta["finished_groups"]) <= {0, 1}

        empty = buffer.http.post("/get_rollout_data", json={}).json()
        assert empty["success"] is False and empty["message"] == "No data available to read"
        # Read groups are acknowledged after the response went out, and the generator may still be writing
        # group 2: wait until only the incomplete group's three items are held.
        deadline = time.monotonic() + 10
        while (stats := buffer.http.get("/v1/stats").json())["items_held"] != 3:
            assert time.monotonic() < deadline, stats
            time.sleep(0.02)
        assert stats["groups_incomplete"] == 1 and stats["groups_complete"] == 0
        assert stats["group_size"] == 3 and stats["task_type"] == "toy"


def test_buffer_write_answers_like_slime_and_stores_a_retry_once(buffer: ServedBuffer) -> None:
    item = trajectory("u1", 7, reward=0.5)
    first = buffer.http.post("/buffer/write", json=item)
    assert first.status_code == 200
    body = first.json()
    assert body["success"] is True
    assert body["data"] == {"data": [item], "meta_info": "write to buffer"}
    again = buffer.http.post("/buffer/write", json=item).json()
    assert again["success"] is True and "Duplicate" in again["message"]

    buffer.http.post("/buffer/write", json=trajectory("u2", 7, reward=1.5)).raise_for_status()
    items, meta = _get_rollout_data(buffer.http)
    assert [i["uid"] for i in items] == ["u1", "u2"]
    assert meta == {
        "total_samples": 2,
        "num_groups": 1,
        "avg_group_size": 2,
        "avg_reward": 1.0,
        "finished_groups": [7],
    }


def test_start_rollout_rejects_unknown_task_types_and_bad_sizes(buffer: ServedBuffer) -> None:
    unknown = buffer.http.post("/start_rollout", json={"task_type": "nope", "num_repeat_per_sample": "2"})
    assert unknown.status_code == 422 and unknown.json()["error"]["field"] == "task_type"
    assert "no generator for 'nope'" in unknown.json()["error"]["message"]
    missing = buffer.http.post("/start_rollout", json={"num_repeat_per_sample": "2"})
    assert missing.status_code == 422 and missing.json()["error"]["field"] == "task_type"


def test_generator_discovery_errors_name_the_flag_and_file(tmp_path: Path) -> None:
    (tmp_path / "broken.py").write_text("raise RuntimeError('boom')\n")
    with pytest.raises(
        GeneratorError, match=r"--generator-dir: importing .*broken\.py failed: RuntimeError: boom"
    ):
        GeneratorRegistry.discover([tmp_path], [])
    with pytest.raises(GeneratorError, match="--generator-module 'json': the module must define TASK_TYPE"):
        GeneratorRegistry.discover([], ["json"])
    with pytest.raises(GeneratorError, match="not a directory"):
        GeneratorRegistry.discover([tmp_path / "missing"], [])
