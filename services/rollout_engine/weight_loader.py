"""Checking and applying Hugging Face-named weights to the built-in engine's model, all or nothing.

Every update path (checkpoint directory, shared tensors, broadcast) ends here: names and shapes are checked
against the model before any live weight is written, so a bad update leaves the served weights unchanged.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from services.rollout_engine.model import CausalLM, ParamTarget

logger = logging.getLogger(__name__)

# Buffers some checkpoints carry that are recomputed, not loaded.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class WeightUpdateError(ValueError):
    """A weight update that cannot be applied; nothing was changed. ``field`` names the request field at fault."""

    def __init__(self, message: str, field: str = "names"):
        super().__init__(message)
        self.field = field


def _skipped(name: str, model: CausalLM) -> bool:
    # A tied model's lm_head is its embedding; SGLang skips lm_head.weight for such models too.
    return name.endswith(IGNORED_SUFFIXES) or (model.cfg.tie_word_embeddings and name == "lm_head.weight")


def check_metadata(model: CausalLM, items: Iterable[tuple[str, tuple[int, ...], torch.dtype]]) -> None:
    """Raise ``WeightUpdateError`` naming every unknown name, wrong shape or non-float dtype (up to 5 of each)."""
    targets = model.param_targets()
    unknown, wrong_shape, wrong_dtype = [], [], []
    for name, shape, dtype in items:
        if _skipped(name, model):
            continue
        target = targets.get(name)
        if target is None:
            unknown.append(name)
        elif tuple(shape) != target.shape:
            wrong_shape.append(f"{name}: got {list(shape)}, expected {list(target.shape)}")
        elif not dtype.is_floating_point:
            wrong_dtype.append(f"{name}: {dtype} is not a floating-point dtype")
    problems = []
    if unknown:
        problems.append(
            f"unknown parameter names {unknown[:5]}"
            + (f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else "")
        )
    if wrong_shape:
        problems.append("wrong shapes: " + "; ".join(wrong_shape[:5]))
    if wrong_dtype:
        problems.append("wrong dtypes: " + "; ".join(wrong_dtype[:5]))
    if problems:
        raise WeightUpdateError(
            "weight update rejected, previous weights kept: " + ", ".join(problems),
            field="shapes" if wrong_shape and not unknown else "names",
        )


def apply_named_tensors(model: CausalLM, named: list[tuple[str, torch.Tensor]]) -> int:
    """Check all of ``named``, then copy it into the model (cast to the model's dtype); returns tensors loaded."""
    check_metadata(model, [(name, tuple(t.shape), t.dtype) for name, t in named])
    targets = model.param_targets()
    loaded = 0
    for name, tensor in named:
        if _skipped(name, model):
            continue
        target: ParamTarget = targets[name]
        target.view().copy_(tensor, non_blocking=True)
        loaded += 1
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    return loaded


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of a Hugging Face directory (via its index when sharded)."""
    root = Path(model_dir)
    if not root.is_dir():
        raise WeightUpdateError(f"model_path {str(root)!r} is not a directory", field="model_path")
    index = root / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = sorted({root / f for f in weight_map.values()})
    else:
        files = sorted(root.glob("*.safetensors"))
    if not files:
        raise WeightUpdateError(f"no *.safetensors files in {str(root)!r}", field="model_path")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise WeightUpdateError(
            f"index of {str(root)!r} names missing files {missing[:3]}", field="model_path"
        )
    return files


def iter_checkpoint(model_dir: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for path in checkpoint_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open handles are not iterable
                yield name, f.get_tensor(name)


def read_checkpoint(model_dir: str | Path) -> list[tuple[str, torch.Tensor]]:
    """Every tensor of a checkpoint directory, in CPU memory (read fully before anything is applied)."""
    try:
        return list(iter_checkpoint(model_dir))
    except WeightUpdateError:
        raise
    except Exception as exc:
        raise WeightUpdateError(
            f"cannot read checkpoint {str(model_dir)!r}: {exc}", field="model_path"
        ) from exc


def load_initial_weights(model: CausalLM, model_dir: str | Path) -> None:
    """Load a checkpoint into a freshly built model; every parameter must be present."""
    named = read_checkpoint(model_dir)
    present = {name for name, _ in named}
    missing = sorted(set(model.param_targets()) - present)
    if missing:
        raise WeightUpdateError(
            f"checkpoint {str(model_dir)!r} lacks parameters {missing[:5]}", field="model_path"
        )
    apply_named_tensors(model, named)
