"""Tests of the `slime` command line: `slime args` in real subprocesses, lazy dispatch of the other commands."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from services import cli

ROOT = Path(__file__).resolve().parents[2]
SEED = json.loads((Path(__file__).parent / "data" / "seed_flags.json").read_text(encoding="utf-8"))["flags"]
ARGS = ["--rollout-batch-size", "8", "--num-rollout", "2", "--n-samples-per-prompt", "4"]


def _slime(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *argv], cwd=ROOT, capture_output=True, text=True, timeout=60
    )


def test_args_json_has_every_seed_dest_with_its_default() -> None:
    result = _slime("args", *ARGS, "--format", "json")
    assert result.returncode == 0, result.stderr
    values: dict[str, Any] = json.loads(result.stdout)
    assert list(values) == sorted(values)  # dicts keep the order of the JSON text
    given = {"rollout_batch_size": 8, "num_rollout": 2, "n_samples_per_prompt": 4}
    derived = {
        "critic_num_nodes": 1,
        "critic_num_gpus_per_node": 8,
        "critic_lr": 1e-6,
        "eps_clip_high": 0.2,
        "over_sampling_batch_size": 8,
        "eval_function_path": "slime.rollout.sglang_rollout.generate_rollout",
        "global_batch_size": 32,
        "start_rollout_id": 0,
    }
    for flag in SEED:
        dest = flag["dest"]
        expected = given.get(dest, derived.get(dest, flag["default"]))
        assert values[dest] == expected, flag["option"]
    assert values["sglang_passthrough"] == {} and values["megatron_extra_argv"] == []
    assert values["sglang_server_concurrency"] == 512 and values["lr_decay_style"] == "linear"
    assert "slime_args_output_format" not in values


def test_args_bad_choice_exits_2_naming_flag_and_choices() -> None:
    result = _slime("args", *ARGS, "--advantage-estimator", "bogus")
    assert result.returncode == 2
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    assert "--advantage-estimator" in result.stderr
    for choice in ("grpo", "gspo", "reinforce_plus_plus", "reinforce_plus_plus_baseline", "ppo"):
        assert f"'{choice}'" in result.stderr


@pytest.mark.parametrize(
    ("extra", "fragments"),
    [
        (["--use-dynamic-batch-size"], ["--use-dynamic-batch-size requires --max-tokens-per-gpu"]),
        (["--use-kl-loss", "--ref-load", "/nonexistent/ref"], ["--ref-load /nonexistent/ref does not exist"]),
        (["--colocat"], ["unrecognized argument --colocat", "did you mean --colocate"]),
        (["--format", "yaml"], ["--format", "'json'", "'text'"]),
    ],
)
def test_args_validation_errors_exit_2(extra: list[str], fragments: list[str]) -> None:
    result = _slime("args", *ARGS, *extra)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr


def test_args_text_format_from_argument_file(tmp_path: Path) -> None:
    args_file = tmp_path / "run.args"
    args_file.write_text(
        "--rollout-batch-size 8 --num-rollout 2  # batch\n--sglang-mem-fraction-static 0.8\n"
    )
    result = _slime("args", f"@{args_file}", "--format", "text")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "rollout_batch_size = 8" in lines
    assert 'sglang_passthrough = {"mem_fraction_static": 0.8}' in lines
    assert lines == sorted(lines)


def test_args_prints_non_json_values_as_strings(tmp_path: Path) -> None:
    config = tmp_path / "custom.yaml"
    config.write_text("release_day: 2025-10-24\n")
    result = _slime("args", *ARGS, "--custom-config-path", str(config))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["release_day"] == "2025-10-24"


def test_help_and_args_stay_light() -> None:
    probe = (
        "import contextlib, io, json, sys\n"
        "from services import cli\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    assert cli.main(['--help']) == 0\n"
        f"    assert cli.main(['args', *{ARGS!r}]) == 0\n"
        "heavy = ('torch', 'transformers', 'fastapi', 'grpc', 'redis', 'yaml', 'trainer', 'router',\n"
        "         'rollout_buffer', 'services.rollout_engine', 'services.reward_model')\n"
        "print(json.dumps([name for name in heavy if name in sys.modules]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []


@pytest.mark.parametrize("argv", [["--help"], ["args", *ARGS]], ids=["help", "args"])
def test_answers_in_under_a_second(argv: list[str]) -> None:
    # Best of three: the machine is shared, and one slow start says nothing about the imports.
    timings = []
    for _ in range(3):
        start = time.perf_counter()
        assert _slime(*argv).returncode == 0
        timings.append(time.perf_counter() - start)
    assert min(timings) < 1.0, timings


def test_args_help_lists_every_group() -> None:
    result = _slime("args", "--help")
    assert result.returncode == 0
    for title in (
        "Cluster:",
        "Fault Tolerance:",
        "Rollout Buffer:",
        "SGLang:",
        "Megatron:",
        "Service:",
        "Output:",
    ):
        assert title in result.stdout
    assert "--rollout-batch-size" in result.stdout and "--format" in result.stdout


def test_missing_or_unknown_command_exits_2() -> None:
    assert _slime().returncode == 2
    unknown = _slime("fly")
    assert unknown.returncode == 2 and "unknown command 'fly'" in unknown.stderr
    bad_service = _slime("serve", "database")
    assert (
        bad_service.returncode == 2
        and "rollout-engine, router, reward-model, rollout-buffer" in bad_service.stderr
    )
    assert _slime("serve").returncode == 2
    assert _slime("serve", "--help").returncode == 0


def _write_module(directory: Path, name: str, body: str) -> None:
    (directory / f"{name}.py").write_text(body)


def test_serve_dispatches_lazily(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _write_module(
        tmp_path,
        "slime_cli_probe_service",
        "CALLS = []\ndef main(argv):\n    CALLS.append(argv)\n    return 3\n",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.SERVICES, "router", "slime_cli_probe_service")
    assert "slime_cli_probe_service" not in sys.modules
    assert cli.main(["serve", "router", "--port", "30000"]) == 3
    assert sys.modules["slime_cli_probe_service"].CALLS == [["--port", "30000"]]


def test_train_and_demo_dispatch(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _write_module(
        tmp_path,
        "slime_cli_probe_driver",
        "CALLS = []\ndef main(argv, mode=None):\n    CALLS.append((argv, mode))\n    return 0\n",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(cli, "TRAIN_MODULE", "slime_cli_probe_driver")
    monkeypatch.setattr(cli, "DEMO_MODULE", "slime_cli_probe_driver")
    assert cli.main(["train", "--num-rollout", "1"]) == 0
    assert cli.main(["train-async", "--num-rollout", "2"]) == 0
    assert cli.main(["demo", "--quick"]) == 0
    assert sys.modules["slime_cli_probe_driver"].CALLS == [
        (["--num-rollout", "1"], "sync"),
        (["--num-rollout", "2"], "async"),
        (["--quick"], None),
    ]


def test_missing_service_module_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _write_module(tmp_path, "slime_cli_probe_broken", "import slime_cli_no_such_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.SERVICES, "router", "slime_cli_probe_absent.server")
    monkeypatch.setitem(cli.SERVICES, "reward-model", "slime_cli_probe_broken")
    with pytest.raises(SystemExit) as excinfo:
        cli.main(["serve", "router"])
    assert excinfo.value.code == 1
    assert (
        "the router service is not available: its module slime_cli_probe_absent.server"
        in capsys.readouterr().err
    )
    with pytest.raises(SystemExit):
        cli.main(["serve", "reward-model"])
    assert "needs the Python package 'slime_cli_no_such_dependency'" in capsys.readouterr().err
