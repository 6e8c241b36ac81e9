"""Checkpoints of a training run and exports to the Hugging Face format.

Layout of ``--save`` (and of ``--critic-save`` for the critic), resumable with a different number of ranks::

    latest_checkpointed_iteration.txt   the last complete rollout id (written last, atomically)
    iter_0000012/model/                 torch.distributed.checkpoint (sharded) model state
    iter_0000012/optim/                 … optimizer state
    iter_0000012/rank_00000.pt          per-rank RNG states and the learning-rate schedule
    iter_0000012/driver_state.pt        rollout id and the state the driver registered (e.g. data-source position)

A Hugging Face export is a directory with ``config.json``, ``model.safetensors`` (or shards plus
``model.safetensors.index.json``), ``generation_config.json`` and the tokenizer files, loadable by SGLang and
``transformers`` directly.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)

TRACKER_FILE = "latest_checkpointed_iteration.txt"
DRIVER_STATE_FILE = "driver_state.pt"
HF_SHARD_BYTES = 5 * 1024**3


def iteration_dir(root: str | os.PathLike, rollout_id: int) -> Path:
    return Path(root) / f"iter_{rollout_id:07d}"


def latest_iteration(root: str | os.PathLike) -> int | None:
    """The rollout id of the last complete checkpoint under ``root``, or None when there is none."""
    tracker = Path(root) / TRACKER_FILE
    if not tracker.is_file():
        return None
    text = tracker.read_text().strip()
    if not text.isdigit():
        raise ValueError(f"{tracker}: expected a rollout id, found {text!r}")
    return int(text)


def is_checkpoint_root(path: str | os.PathLike) -> bool:
    return (Path(path) / TRACKER_FILE).is_file()


def resolve_iteration(
    root: str | os.PathLike, step: int | None = None, *, flag: str = "--load"
) -> int | None:
    """``step`` when given (it must exist), else the latest complete checkpoint, else None."""
    if step is None:
        return latest_iteration(root)
    if not (iteration_dir(root, step) / "model").is_dir():
        raise FileNotFoundError(
            f"{flag} {root}: no checkpoint for rollout {step} ({iteration_dir(root, step)})"
        )
    return step


def commit(root: str | os.PathLike, rollout_id: int) -> None:
    """Mark the checkpoint of ``rollout_id`` complete; a crash before this leaves the previous one as latest."""
    tracker = Path(root) / TRACKER_FILE
    tmp = tracker.with_suffix(".tmp")
    tmp.write_text(f"{rollout_id}\n")
    os.replace(tmp, tracker)


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _single_process() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized())


@contextlib.contextmanager
def _dcp_context() -> Iterator[bool]:
    """Yield ``no_dist`` for torch.distributed.checkpoint; a one-rank trainer has no process group, which DCP
    handles but warns about on every call."""
    single = _single_process()
    with warnings.catch_warnings():
        if single:
            warnings.filterwarnings("ignore", message="torch.distributed is .*uninitialized")
        yield single


def save_model(path: Path, model: nn.Module) -> None:
    """Sharded model state (every rank calls this)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    with _dcp_context() as no_dist:
        dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=str(path), no_dist=no_dist)


def load_model(path: Path, model: nn.Module) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    if not path.is_dir():
        raise FileNotFoundError(f"no model checkpoint at {path}")
    state = {"model": get_model_state_dict(model)}
    with _dcp_context() as no_dist:
        dcp.load(state, checkpoint_id=str(path), no_dist=no_dist)
    set_model_state_dict(model, state["model"])


def save_optimizer(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    with _dcp_context() as no_dist:
        dcp.save(
            {"optim": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=str(path), no_dist=no_dist
        )


def load_optimizer(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    if not path.is_dir():
        raise FileNotFoundError(f"no optimizer checkpoint at {path}")
    state = {"optim": get_optimizer_state_dict(model, optimizer)}
    with _dcp_context() as no_dist:
        dcp.load(state, checkpoint_id=str(path), no_dist=no_dist)
    set_optimizer_state_dict(model, optimizer, state["optim"])


def save_rank_state(path: Path, state: dict[str, Any]) -> None:
    torch.save(state, path)


def load_rank_state(path: Path) -> dict[str, Any]:
    # Holds numpy RNG state and python tuples, which the weights-only unpickler rejects.
    return torch.load(path, weights_only=False)


def save_driver_state(directory: Path, rollout_id: int, extra: dict[str, Any]) -> None:
    torch.save({"rollout_id": rollout_id, "extra": extra}, directory / DRIVER_STATE_FILE)


def load_driver_state(directory: Path) -> dict[str, Any]:
    path = directory / DRIVER_STATE_FILE
    if not path.is_file():
        return {"rollout_id": None, "extra": {}}
    return torch.load(path, weights_only=False)


def read_hf_weights(path: str | os.PathLike, *, flag: str) -> dict[str, torch.Tensor]:
    """Full weights by name from a Hugging Face directory (every ``*.safetensors`` file in it)."""
    root = Path(path)
    if not (root / "config.json").is_file():
        raise FileNotFoundError(
            f"{flag} {path}: neither a checkpoint ({TRACKER_FILE}) nor a Hugging Face directory"
        )
    return _read_safetensors_dir(root)


def _read_safetensors_dir(root: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{root}: no *.safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    return state


def write_hf_checkpoint(
    out_dir: str | os.PathLike,
    state: dict[str, torch.Tensor],
    *,
    config: Any,
    architecture: str,
    tokenizer_source: str | None,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = HF_SHARD_BYTES,
) -> Path:
    """Write a Hugging Face model directory from full weights (rank 0 only).

    ``config`` is the model's ``PretrainedConfig``; ``architecture`` its class name (the wrapped class of an FSDP
    model would otherwise leak into ``config.json``); ``tokenizer_source`` a directory whose tokenizer is copied.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.to(dtype) if dtype is not None else v).contiguous().cpu() for k, v in state.items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    for old in out.glob("model*.safetensors*"):
        old.unlink()
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        )
    write_hf_config_and_tokenizer(
        out, config=config, architecture=architecture, tokenizer_source=tokenizer_source, dtype=dtype
    )
    logger.info("exported %d tensors in %d shard(s) to %s", len(tensors), len(shards), out)
    return out


def write_hf_config_and_tokenizer(
    out: Path,
    *,
    config: Any,
    architecture: str,
    tokenizer_source: str | None,
    dtype: torch.dtype | None = None,
) -> None:
    """``config.json`` (with ``architectures`` set to the Hugging Face class) and the tokenizer and generation
    config copied from ``tokenizer_source``."""
    config = config.__class__.from_dict(config.to_dict())
    config.architectures = [architecture]
    if dtype is not None:
        config.dtype = dtype
    config.save_pretrained(out)
    if tokenizer_source is not None:
        _copy_tokenizer_and_generation_config(Path(tokenizer_source), out)


_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)


def _copy_tokenizer_and_generation_config(source: Path, out: Path) -> None:
    if source.resolve() == out.resolve():
        return
    for name in _TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, out / name)
