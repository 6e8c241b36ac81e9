"""The driver's checks of network, logging and debug flags: a clear error naming the flag before anything starts,
or a warning where slime would silently ignore a flag."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from services.core.arguments import parse_args
from trainer import driver

BASE = [
    "--train-backend", "fsdp",
    "--hf-checkpoint", "unused-model",
    "--prompt-data", "unused.jsonl",
    "--rollout-batch-size", "2",
    "--num-rollout", "1",
]  # fmt: skip


def _error(*flags: str) -> str:
    with pytest.raises(SystemExit) as exc:
        driver.main([*BASE, *flags])
    return str(exc.value.code)


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--rollout-external"], "--rollout-external-engine-addrs"),
        (["--use-distributed-post", "--num-gpus-per-node", "0"], "--num-gpus-per-node"),
        (["--record-memory-history", "--memory-snapshot-path", "dir/x.pickle"], "--memory-snapshot-path"),
        (["--use-tensorboard"], "--tb-project-name"),
        (["--distributed-backend", "nccl2"], "--distributed-backend"),
    ],
)
def test_bad_flags_stop_the_driver_naming_the_flag(
    flags: list[str], named: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TENSORBOARD_DIR", raising=False)
    message = _error(*flags)
    assert message.startswith("slime train: error:") and named in message


def test_a_snapshot_dir_that_is_a_file_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("")
    assert "--memory-snapshot-dir" in _error("--memory-snapshot-dir", str(tmp_path / "taken"))


def test_megatron_only_flags_with_the_fsdp_backend_are_called_out(caplog: pytest.LogCaptureFixture) -> None:
    args = parse_args([*BASE, "--use-routing-replay", "--model-name", "qwen2"])
    with caplog.at_level(logging.WARNING, logger=driver.__name__):
        driver._check_flags(args, "slime train")
    assert "--use-routing-replay, --model-name: read only by --train-backend megatron" in caplog.text


def test_distributed_backend_is_honoured_except_nccl_on_cpu() -> None:
    import torch

    from services.core.process_group import training_backend

    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert training_backend("nccl", cpu) == "gloo"  # the seed's default, where NCCL cannot run
    assert training_backend("nccl", gpu) == "nccl"
    assert training_backend("gloo", gpu) == "gloo"
    assert training_backend("GLOO", cpu) == "gloo"
    with pytest.raises(ValueError, match="--distributed-backend 'gl00'"):
        training_backend("gl00", cpu)
