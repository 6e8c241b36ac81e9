"""How new weights reach a running engine without a restart: shared-memory / CUDA IPC tensor handles
(``/update_weights_from_tensor``) and a torch.distributed group fed by broadcasts (``/update_weights_from_distributed``).

Tensor payloads are SGLang's: base64 of a ``ForkingPickler`` dump of either ``[(name, tensor), ...]`` (load format
unset) or a ``flattened_bucket`` dict ``{"flattened_tensor", "metadata": [FlattenedTensorMetadata]}``. They are
unpickled with an allow-list of torch's rebuild functions, so a request cannot run arbitrary code. CPU tensors
must be shared with the ``file_system`` strategy (a path an unrelated process can open).
"""

from __future__ import annotations

import base64
import contextlib
import io
import logging
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.reduction import ForkingPickler
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as torch_mp

from services.rollout_engine.weight_loader import WeightUpdateError

logger = logging.getLogger(__name__)

LOAD_FORMATS = (None, "auto", "flattened_bucket")


@dataclass
class FlattenedTensorMetadata:
    """One tensor inside a flattened bucket (field names as in SGLang's ``weight_sync.tensor_bucket``)."""

    name: str
    shape: torch.Size
    dtype: torch.dtype
    start_idx: int
    end_idx: int
    numel: int


_REDUCTIONS = "torch.multiprocessing.reductions"
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    (_REDUCTIONS, "rebuild_tensor"): None,
    (_REDUCTIONS, "rebuild_cuda_tensor"): None,
    (_REDUCTIONS, "rebuild_typed_storage"): None,
    (_REDUCTIONS, "rebuild_typed_storage_child"): None,
    (_REDUCTIONS, "rebuild_storage_filename"): None,
    (_REDUCTIONS, "rebuild_storage_empty"): None,
    ("torch", "Tensor"): None,
    ("torch", "Size"): None,
    ("torch.nn.parameter", "Parameter"): None,
    ("torch.storage", "UntypedStorage"): None,
    ("torch.storage", "TypedStorage"): None,
    ("sglang.srt.weight_sync.tensor_bucket", "FlattenedTensorMetadata"): FlattenedTensorMetadata,
    (__name__, "FlattenedTensorMetadata"): FlattenedTensorMetadata,
}


class _TensorUnpickler(pickle.Unpickler):
    """Unpickles tensor handles only: torch rebuild functions, dtypes, sizes and bucket metadata."""

    def find_class(self, module: str, name: str) -> Any:
        key = (module, name)
        if key in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[key] or super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if key == (_REDUCTIONS, "rebuild_storage_fd"):
            raise pickle.UnpicklingError(
                "CPU tensors were shared as file descriptors, which only a child process can open; share them with "
                "torch.multiprocessing.set_sharing_strategy('file_system')"
            )
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a tensor payload")


@contextlib.contextmanager
def file_system_sharing() -> Iterator[None]:
    """Share CPU tensors through named shared-memory files while pickling (restores the previous strategy)."""
    previous = torch_mp.get_sharing_strategy()
    torch_mp.set_sharing_strategy("file_system")
    try:
        yield
    finally:
        torch_mp.set_sharing_strategy(previous)


def serialize(obj: Any) -> str:
    """SGLang's ``MultiprocessingSerializer.serialize(obj, output_str=True)``: storages travel as handles."""
    buf = io.BytesIO()
    with file_system_sharing():
        ForkingPickler(buf).dump(obj)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def flatten_bucket(named: list[tuple[str, torch.Tensor]]) -> dict[str, Any]:
    """Pack same-dtype tensors into one buffer plus metadata: slime's ``flattened_bucket`` payload."""
    if not named:
        return {"flattened_tensor": torch.empty(0, dtype=torch.uint8), "metadata": []}
    dtypes = {t.dtype for _, t in named}
    if len(dtypes) != 1:
        raise ValueError(f"a flattened bucket holds one dtype, got {sorted(str(d) for d in dtypes)}")
    flat = torch.cat([t.detach().reshape(-1) for _, t in named])
    metadata, offset = [], 0
    for name, tensor in named:
        n = tensor.numel()
        metadata.append(FlattenedTensorMetadata(name, tensor.shape, tensor.dtype, offset, offset + n, n))
        offset += n
    return {"flattened_tensor": flat, "metadata": metadata}


def deserialize_named_tensors(payload: str, load_format: str | None) -> list[tuple[str, torch.Tensor]]:
    """Turn one entry of ``serialized_named_tensors`` into ``[(name, tensor)]`` (tensors map the sender's memory)."""
    if load_format not in LOAD_FORMATS:
        raise WeightUpdateError(
            f"load_format {load_format!r} is not supported; use one of {list(LOAD_FORMATS)}",
            field="load_format",
        )
    try:
        raw = base64.b64decode(payload, validate=True)
    except (ValueError, TypeError) as exc:
        raise WeightUpdateError(f"not valid base64: {exc}", field="serialized_named_tensors") from exc
    try:
        obj = _TensorUnpickler(io.BytesIO(raw)).load()
    except Exception as exc:
        raise WeightUpdateError(f"cannot unpickle tensors: {exc}", field="serialized_named_tensors") from exc
    if load_format == "flattened_bucket":
        return _unflatten(obj)
    if not isinstance(obj, list) or not all(
        isinstance(item, (list, tuple))
        and len(item) == 2
        and isinstance(item[0], str)
        and torch.is_tensor(item[1])
        for item in obj
    ):
        raise WeightUpdateError(
            "expected a list of (name, tensor) pairs (or load_format='flattened_bucket')",
            field="serialized_named_tensors",
        )
    return [(name, tensor) for name, tensor in obj]


def _unflatten(obj: Any) -> list[tuple[str, torch.Tensor]]:
    if not isinstance(obj, dict) or not torch.is_tensor(obj.get("flattened_tensor")) or "metadata" not in obj:
        raise WeightUpdateError(
            "a flattened_bucket payload is {'flattened_tensor': tensor, 'metadata': [...]}",
            field="serialized_named_tensors",
        )
    flat = obj["flattened_tensor"]
    out = []
    for meta in obj["metadata"]:
        if (
            not isinstance(meta, FlattenedTensorMetadata)
            or not 0 <= meta.start_idx <= meta.end_idx <= flat.numel()
        ):
            raise WeightUpdateError(f"bad bucket metadata {meta!r}", field="serialized_named_tensors")
        piece = flat[meta.start_idx : meta.end_idx]
        if piece.numel() != torch.Size(meta.shape).numel():
            raise WeightUpdateError(
                f"bucket entry {meta.name}: {piece.numel()} elements for shape {list(meta.shape)}",
                field="serialized_named_tensors",
            )
        out.append((meta.name, piece.view(meta.shape)))
    return out


def parse_dtype(name: str) -> torch.dtype:
    """``"bfloat16"`` (or ``"torch.bfloat16"``) to a torch dtype; ``WeightUpdateError`` otherwise."""
    value = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise WeightUpdateError(f"unknown dtype {name!r} (e.g. 'bfloat16', 'float32')", field="dtypes")
    return value


def receive_broadcasts(
    group: dist.ProcessGroup, shapes: list[list[int]], dtypes: list[torch.dtype], device: torch.device
) -> list[torch.Tensor]:
    """Receive one broadcast from rank 0 per (shape, dtype), in order, into fresh buffers."""
    tensors = [
        torch.empty(shape, dtype=dtype, device=device) for shape, dtype in zip(shapes, dtypes, strict=True)
    ]
    for tensor in tensors:
        dist.broadcast(tensor, src=0, group=group)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return tensors
