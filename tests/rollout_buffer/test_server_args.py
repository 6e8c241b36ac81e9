"""``slime serve rollout-buffer`` flags: defaults, and errors that name the flag at fault."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from rollout_buffer.arguments import parse_args


def test_defaults_follow_the_port() -> None:
    args = parse_args([])
    assert (args.port, args.grpc_port, args.n_samples_per_prompt, args.rollout_task_type) == (
        8889,
        8890,
        1,
        "math",
    )
    assert parse_args(["--port", "9100"]).grpc_port == 9101


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--port", "9000", "--grpc-port", "9000"], "--grpc-port must differ from --port"),
        (["--no-api"], "--no-api runs only rollout workers: give --rollout-workers"),
        (["--lease-timeout", "0"], "--lease-timeout"),
        (["--buffer-max-items", "-3"], "--buffer-max-items"),
        (["--group-expiry-action", "keep"], "--group-expiry-action"),
        (["--n-samples-per-prompt", "0"], "--n-samples-per-prompt must be >= 1"),
    ],
)
def test_bad_flags_exit_2_naming_the_flag(
    argv: list[str], message: str, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit) as info:
        parse_args(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_a_missing_generator_dir_stops_the_service_with_status_2(tmp_path: Path) -> None:
    argv = ["--redis-url", "redis://127.0.0.1:1/0", "--generator-dir", str(tmp_path / "nope")]
    done = subprocess.run(
        [sys.executable, "-m", "rollout_buffer.server", *argv], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert "--generator-dir" in done.stderr and "not a directory" in done.stderr
