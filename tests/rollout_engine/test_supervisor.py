"""The SGLang backend's supervision (start, health wait, proxy, restart on crash). SGLang cannot run on these
machines, so the supervised child here is the built-in engine standing in for ``sglang.launch_server``."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from services.rollout_engine.server import parse_args
from services.rollout_engine.supervisor import sglang_argv


def _wait_status(client, predicate, timeout: float = 90.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status = client.get("/supervisor/status").json()
        if predicate(status):
            return status
        assert time.monotonic() < deadline, status
        time.sleep(0.1)


def _generate(client) -> dict:
    response = client.post(
        "/generate", json={"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 4, "temperature": 0}}
    )
    assert response.status_code == 200, response.text
    return response.json()


def test_supervisor_restarts_crashed_child_with_builtin_engine_standing_in_for_sglang(
    tiny_model_dir: Path, start_engine, tmp_path: Path
) -> None:
    flags = (
        "--engine-backend",
        "sglang",
        "--supervised-child",
        "builtin",
        "--sglang-max-running-requests",
        "8",
    )
    with (
        start_engine(
            tiny_model_dir, *flags, ready_path="/health_generate", env={"SLIME_LOG_DIR": str(tmp_path)}
        ) as sup,
        sup.client() as client,
    ):
        status = _wait_status(client, lambda s: s["ready"])
        assert status["restarts"] == 0 and status["child_pid"]
        assert "--sglang-max-running-requests" in status["command"]
        first = _generate(client)
        assert len(first["output_ids"]) == 4
        info = client.get("/get_server_info").json()
        assert info["engine_backend"] == "builtin" and info["max_running_requests"] == 8
        with client.stream(
            "POST",
            "/generate",
            json={"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 3}, "stream": True},
        ) as response:
            assert response.headers["x-weight-version"] == "default"
            chunks = [line for line in response.iter_lines() if line.startswith("data: {")]
        assert len(json.loads(chunks[-1].removeprefix("data: "))["output_ids"]) == 3
        metrics = client.get("/metrics").text
        assert "slime_rollout_engine_child_up 1.0" in metrics
        assert "slime_rollout_engine_generation_tokens_total" in metrics  # the child's own metrics

        client.post("/update_weight_version", json={"new_version": "7"})
        os.kill(status["child_pid"], signal.SIGKILL)
        down = client.post("/generate", json={"input_ids": [5], "sampling_params": {"max_new_tokens": 1}})
        assert down.status_code in (502, 503)
        restarted = _wait_status(client, lambda s: s["ready"] and s["restarts"] == 1)
        assert restarted["child_pid"] != status["child_pid"]
        again = _generate(client)
        assert again["output_ids"] == first["output_ids"]
        # A restarted engine serves its checkpoint again until the trainer pushes the current weights.
        assert again["meta_info"]["weight_version"] == "default"
        assert "slime_rollout_engine_child_restarts_total 1.0" in client.get("/metrics").text


def test_sglang_command_line_carries_managed_and_passthrough_flags(tiny_model_dir: Path) -> None:
    args = parse_args(
        [
            "--hf-checkpoint",
            str(tiny_model_dir),
            "--rollout-num-gpus-per-engine",
            "2",
            "--sglang-mem-fraction-static",
            "0.7",
            "--sglang-enable-metrics",
            "--sglang-cuda-graph-bs",
            "1",
            "2",
            "4",
            "--sglang-context-length",
            "4096",
        ]
    )
    argv = sglang_argv(args, 31000)
    assert argv[1:3] == ["-m", "sglang.launch_server"]
    joined = " ".join(argv)
    assert f"--model-path {tiny_model_dir}" in joined and "--port 31000" in joined and "--tp-size 2" in joined
    assert "--mem-fraction-static 0.7" in joined and "--enable-metrics" in joined
    assert "--cuda-graph-bs 1 2 4" in joined and "--context-length 4096" in joined
