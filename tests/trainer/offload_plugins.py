"""A ``--rollout-data-postprocess-path`` plugin for the ``--offload`` end-to-end test: while the driver trains, it
records every engine's memory state (``/get_server_info``) in ``$SLIME_TEST_PLUGIN_DIR/engine_memory.jsonl``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import httpx


def record_engine_memory(args: Any) -> None:
    urls = httpx.get(f"{args.router_url}/list_workers", timeout=10).json()["urls"]
    states = [httpx.get(f"{url}/get_server_info", timeout=10).json()["internal_states"][0] for url in urls]
    directory = Path(os.environ["SLIME_TEST_PLUGIN_DIR"])
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / "engine_memory.jsonl").open("a") as fh:
        fh.write(json.dumps([{k: s[k] for k in ("released_tags", "memory_log")} for s in states]) + "\n")
