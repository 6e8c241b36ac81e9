"""Plugins for the driver's end-to-end tests, loaded by path the way users load theirs; each records its calls in
``$SLIME_TEST_PLUGIN_DIR`` so the test can see that the driver (or the service running it) called it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from rollout_buffer.generate import generate as default_generate
from trainer.rollout.filters import DynamicFilterOutput
from trainer.rollout.queue_rollout import generate_rollout as default_rollout


def _record(name: str, payload: Any) -> None:
    directory = Path(os.environ["SLIME_TEST_PLUGIN_DIR"])
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / f"{name}.jsonl").open("a") as fh:
        fh.write(json.dumps(payload) + "\n")


def rollout(args: Any, rollout_id: int, data_source: Any, evaluation: bool = False) -> Any:
    _record("rollout", {"rollout_id": rollout_id, "evaluation": evaluation})
    return default_rollout(args, rollout_id, data_source, evaluation=evaluation)


async def generate(args: Any, sample: Any, sampling_params: dict) -> Any:
    result = await default_generate(args, sample, sampling_params)
    result.metadata["custom_generate"] = True
    _record("generate", {"uid": sample.uid})
    return result


async def generate_recording_pid(args: Any, sample: Any, sampling_params: dict) -> Any:
    """The default generate, marking each sample with the rollout-worker process that posted it."""
    result = await default_generate(args, sample, sampling_params)
    result.metadata["rollout_worker_pid"] = os.getpid()
    return result


async def reward(args: Any, sample: Any, **kwargs: Any) -> float:
    _record("reward", {"uid": sample.uid})
    return float(len(sample.response) % 2)


def keep_all(args: Any, samples: list, **kwargs: Any) -> DynamicFilterOutput:
    _record(
        "filter",
        {"group": samples[0].group_index, "custom_generate": samples[0].metadata.get("custom_generate")},
    )
    return DynamicFilterOutput(keep=True)


def post_process(args: Any, samples: list) -> tuple[list[float], list[float]]:
    raw = [float(s.reward) for s in samples]
    _record("post_process", {"n": len(samples)})
    return raw, [r - 0.5 for r in raw]


def data_postprocess(args: Any, batch: Any) -> None:
    _record("data_postprocess", {"n": len(batch)})
