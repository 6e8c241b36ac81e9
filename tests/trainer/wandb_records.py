"""Read back what an offline W&B run wrote: its ``run-<id>.wandb`` transaction log, parsed into protobuf records.

The file is W&B's record log (the LevelDB log layout): a 7-byte header (``:W&B``, magic, version), then 32 KiB
blocks of chunks, each with a 7-byte header (CRC32, length, type: full, first, middle, last) — wandb no longer
ships a Python reader, so the tests carry this one.
"""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _records(path: Path) -> Iterator[wandb_internal_pb2.Record]:
    data = path.read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run log (header {data[:7]!r})")
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if kind == 0:
            pos += left
            continue
        if pos + HEADER + length > len(data):
            # A chunk wandb-core is still writing: the records so far are complete, this one is not yet.
            return
        pending += data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


@dataclass
class RunRecords:
    run: Any = None
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)


def _complete_records(log: Path, timeout_s: float) -> list[wandb_internal_pb2.Record]:
    # wandb-core may still be flushing the log when run.finish() returns: wait for the run's exit record.
    deadline = time.monotonic() + timeout_s
    while True:
        records = list(_records(log))
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.1)


def wandb_records(run_dir: Path, timeout_s: float = 30.0) -> RunRecords:
    """The run record, config and history rows (user keys only) of one offline run directory."""
    (log,) = run_dir.glob("run-*.wandb")
    out = RunRecords()
    for record in _complete_records(log, timeout_s):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out.run = record.run
            out.config.update({u.key: json.loads(u.value_json) for u in record.run.config.update})
        elif kind == "config":
            out.config.update({u.key: json.loads(u.value_json) for u in record.config.update})
        elif kind == "history":
            row = {
                item.key or "/".join(item.nested_key): json.loads(item.value_json)
                for item in record.history.item
            }
            out.history.append({k: v for k, v in row.items() if not k.startswith("_")})
    return out


def offline_runs(wandb_dir: Path) -> list[Path]:
    """The offline run directories under ``--wandb-dir``, oldest first."""
    return sorted((wandb_dir / "wandb").glob("offline-run-*"))
