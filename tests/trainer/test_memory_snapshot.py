"""``--record-memory-history`` / ``--memory-snapshot-dir`` / ``--memory-snapshot-path``: the CPU behaviour for
real, and the CUDA recorder against a fake of torch's CUDA allocator hooks (there is no GPU here)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from services.core.arguments import parse_args
from trainer import memory_snapshot
from trainer.memory_snapshot import MemoryHistory

BASE = ["--train-backend", "fsdp", "--rollout-batch-size", "2", "--num-rollout", "1"]


def _args(*flags: str):
    return parse_args([*BASE, *flags])


def test_on_cpu_the_flag_is_named_in_a_warning_and_nothing_is_written(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    args = _args("--record-memory-history", "--memory-snapshot-dir", str(tmp_path / "snapshots"))
    with caplog.at_level(logging.WARNING, logger="trainer.memory_snapshot"):
        memory_snapshot.check_flags(args, cuda_available=False)
    assert "--record-memory-history records CUDA memory snapshots and needs a CUDA GPU" in caplog.text
    assert str(tmp_path / "snapshots") in caplog.text
    assert MemoryHistory.start(args, rank=0, role="actor", device=torch.device("cpu")) is None
    assert not (tmp_path / "snapshots").exists()


def test_a_snapshot_dir_without_recording_is_called_out(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="trainer.memory_snapshot"):
        memory_snapshot.check_flags(_args("--memory-snapshot-dir", str(tmp_path)), cuda_available=True)
    assert "has no effect without --record-memory-history" in caplog.text


def test_bad_snapshot_locations_name_the_flag(tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(ValueError, match="--memory-snapshot-dir"):
        memory_snapshot.check_flags(_args("--memory-snapshot-dir", str(a_file)), cuda_available=True)
    with pytest.raises(ValueError, match="--memory-snapshot-path"):
        memory_snapshot.check_flags(
            _args("--record-memory-history", "--memory-snapshot-path", "a/b.pickle"), cuda_available=True
        )


def test_with_fake_cuda_hooks_history_is_recorded_and_dumped_into_the_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, object]] = []
    observers = []

    def record(enabled: str | None = "all", **kwargs: object) -> None:
        calls.append(("record", enabled, kwargs.get("max_entries"), kwargs.get("stacks")))

    def dump(path: str) -> None:
        Path(path).write_bytes(b"snapshot")
        calls.append(("dump", Path(path).name))

    monkeypatch.setattr(torch.cuda.memory, "_record_memory_history", record)
    monkeypatch.setattr(torch.cuda.memory, "_dump_snapshot", dump)
    monkeypatch.setattr(torch._C, "_cuda_attach_out_of_memory_observer", observers.append, raising=False)
    directory = tmp_path / "snapshots"
    args = _args(
        "--record-memory-history",
        "--memory-snapshot-dir",
        str(directory),
        "--memory-snapshot-path",
        "mem.pickle",
    )

    history = MemoryHistory.start(args, rank=1, role="actor", device=torch.device("cuda", 1))
    assert history is not None and directory.is_dir()
    assert calls == [("record", "all", memory_snapshot.MAX_ENTRIES, "all")]
    (on_oom,) = observers
    on_oom(1, 1 << 30, 2 << 30, 0)  # what the allocator calls when an allocation fails
    assert (directory / "oom_rank-1_mem.pickle").read_bytes() == b"snapshot"
    assert history.stop() == directory / "rank-1_mem.pickle"
    assert calls[-2:] == [("dump", "rank-1_mem.pickle"), ("record", None, None, None)]

    critic = MemoryHistory.start(args, rank=0, role="critic", device=torch.device("cuda", 0))
    assert critic.path("oom_").name == "oom_critic-rank-0_mem.pickle"
