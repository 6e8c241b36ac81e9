"""Megatron's ``torch`` checkpoint format (``--ckpt-format torch``), written and read with plain torch.

Layout (what Megatron-LM's ``load_checkpoint`` reads for a release checkpoint)::

    latest_checkpointed_iteration.txt      "release"
    release/mp_rank_00/model_optim_rng.pt  {"model": state dict of TP rank 0, "checkpoint_version": 3.0, ...}
    release/mp_rank_01/...                 (with pipeline stages: mp_rank_TT_PPP)
    hf_config.json                         the Hugging Face config the weights came from, for the way back

No megatron-core is needed, so ``slime convert`` runs on any machine.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from trainer.backends.megatron_backend import convert

TRACKER_FILE = "latest_checkpointed_iteration.txt"
RELEASE = "release"
HF_CONFIG_FILE = "hf_config.json"
CHECKPOINT_VERSION = 3.0


def rank_dir(root: Path, tp_rank: int, pp_rank: int, pp_size: int) -> Path:
    name = f"mp_rank_{tp_rank:02d}" if pp_size == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"
    return root / RELEASE / name


def is_release_checkpoint(path: str | os.PathLike) -> bool:
    tracker = Path(path) / TRACKER_FILE
    return tracker.is_file() and tracker.read_text().strip() == RELEASE


def write(
    out_dir: str | os.PathLike,
    mg: dict[str, torch.Tensor],
    shape: convert.ModelShape,
    *,
    hf_config: dict[str, Any],
    tp_size: int = 1,
    pp_size: int = 1,
    te_names: bool = False,
) -> Path:
    """Write a full Megatron state dict split over ``tp_size × pp_size`` ranks."""
    convert.check_tp_compatible(shape, tp_size)
    root = Path(out_dir)
    for pp_rank in range(pp_size):
        stage = convert.stage_state(mg, shape, pp_size, pp_rank)
        for tp_rank in range(tp_size):
            shard = {
                name: convert.split_for_tp(name, tensor, tp_size)[tp_rank].contiguous().clone()
                for name, tensor in stage.items()
            }
            if te_names:
                shard = convert.to_te_names(shard)
            directory = rank_dir(root, tp_rank, pp_rank, pp_size)
            directory.mkdir(parents=True, exist_ok=True)
            torch.save(
                {"model": shard, "checkpoint_version": CHECKPOINT_VERSION, "iteration": 0},
                directory / "model_optim_rng.pt",
            )
    meta = dict(hf_config)
    meta["_megatron"] = {
        "tensor_model_parallel_size": tp_size,
        "pipeline_model_parallel_size": pp_size,
        "padded_vocab_size": shape.padded_vocab_size,
    }
    (root / HF_CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    (root / TRACKER_FILE).write_text(RELEASE + "\n")
    return root


def read(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], convert.ModelShape, dict[str, Any]]:
    """The full Megatron state dict (TP shards gathered, pipeline stages renumbered back), its shape and the
    Hugging Face config stored beside it."""
    root = Path(path)
    if not is_release_checkpoint(root):
        raise FileNotFoundError(
            f"{root}: not a Megatron release checkpoint ({TRACKER_FILE} saying {RELEASE})"
        )
    meta = json.loads((root / HF_CONFIG_FILE).read_text())
    layout = meta.pop("_megatron")
    tp_size, pp_size = layout["tensor_model_parallel_size"], layout["pipeline_model_parallel_size"]
    shape = convert.ModelShape.from_hf_config(meta, padded_vocab=layout["padded_vocab_size"])
    full: dict[str, torch.Tensor] = {}
    for pp_rank in range(pp_size):
        layers = convert.stage_layers(shape.num_layers, pp_size, pp_rank)
        shards = [
            torch.load(rank_dir(root, r, pp_rank, pp_size) / "model_optim_rng.pt", weights_only=True)["model"]
            for r in range(tp_size)
        ]
        for name in shards[0]:
            if name.endswith("_extra_state"):
                continue
            tensor = convert.gather_from_tp(_local_name(name), [s[name] for s in shards])
            name = _local_name(name)
            if name.startswith("decoder.layers."):
                index, rest = name.removeprefix("decoder.layers.").split(".", 1)
                name = f"decoder.layers.{int(index) + layers.start}.{rest}"
            elif name == "output_layer.weight" and shape.tie_word_embeddings:
                continue
            full[name] = tensor
    return full, shape, meta


def _local_name(name: str) -> str:
    for local, te in convert._TE_NORM_NAMES.items():
        if name.endswith("." + te):
            return name[: -len(te)] + local
    return name
