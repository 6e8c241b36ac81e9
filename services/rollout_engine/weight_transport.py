"""How new weights reach a running engine without a restart: shared-memory / CUDA IPC tensor handles
(``/update_weights_from_tensor``) and a torch.distributed group fed by broadcasts (``/update_weights_from_distributed``).

Tensor payloads are SGLang's: base64 of a ``ForkingPickler`` dump of either ``[(name, tensor), ...]`` (load format
unset) or a ``flattened_bucket`` dict ``{"flattened_tensor", "metadata": [FlattenedTensorMetadata]}``. They are
unpickled with an allow-list of torch's rebuild functions, so a request cannot run arbitrary code. CPU tensors
must be shared with the ``file_system`` strategy (a path an unrelated process can open).

Broadcasts come one per tensor (load format unset) or, with ``flattened_bucket``, as one uint8 tensor per request:
every tensor's bytes, concatenated in the order of ``names`` (SGLang's ``FlattenedTensorBucket``).
"""

from __future__ import annotations

import base64
import contextlib
import io
import logging
import math
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

FLATTENED_BUCKET = "flattened_bucket"
LOAD_FORMATS = (None, "auto", FLATTENED_BUCKET)
# What ``/update_weights_from_distributed`` accepts as ``load_format``: None is one broadcast per tensor.
DISTRIBUTED_LOAD_FORMATS = (None, FLATTENED_BUCKET)
# Advertised in ``/get_server_info`` (``weight_update_load_formats``): both update endpoints take SGLang's
# flattened buckets, so a trainer can send them knowing this engine reads them.
ADVERTISED_LOAD_FORMATS = (FLATTENED_BUCKET,)


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
        if piece.dtype == torch.uint8 and meta.dtype != torch.uint8:
            # SGLang's current buckets are raw bytes (uint8, indices in bytes) holding tensors of any dtype.
            piece = _view_bytes_as(piece, meta.dtype, field="serialized_named_tensors")
        if piece.numel() != torch.Size(meta.shape).numel():
            raise WeightUpdateError(
                f"bucket entry {meta.name}: {piece.numel()} elements for shape {list(meta.shape)}",
                field="serialized_named_tensors",
            )
        out.append((meta.name, piece.view(meta.shape)))
    return out


def _view_bytes_as(piece: torch.Tensor, dtype: torch.dtype, *, field: str) -> torch.Tensor:
    """A uint8 slice read as ``dtype``: a view when it starts on a multiple of the itemsize, else a copy (a bucket
    packs tensors back to back, so an odd-sized bf16 tensor leaves the next fp32 one misaligned)."""
    if piece.numel() % dtype.itemsize:
        raise WeightUpdateError(f"{piece.numel()} bytes cannot be read as {dtype}", field=field)
    if piece.storage_offset() % dtype.itemsize:
        piece = piece.clone()
    return piece.view(dtype)


def tensors_from_bytes(
    flat: torch.Tensor, shapes: list[list[int]], dtypes: list[torch.dtype]
) -> list[torch.Tensor]:
    """Split a flattened bucket's bytes back into its tensors, in order (views of ``flat`` where aligned)."""
    tensors, offset = [], 0
    for shape, dtype in zip(shapes, dtypes, strict=True):
        size = math.prod(shape) * dtype.itemsize
        piece = _view_bytes_as(flat[offset : offset + size], dtype, field="shapes")
        tensors.append(piece.view(shape))
        offset += size
    return tensors


def parse_dtype(name: str) -> torch.dtype:
    """``"bfloat16"`` (or ``"torch.bfloat16"``) to a torch dtype; ``WeightUpdateError`` otherwise."""
    value = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise WeightUpdateError(f"unknown dtype {name!r} (e.g. 'bfloat16', 'float32')", field="dtypes")
    return value


class BucketBuffer:
    """Where flattened buckets are received. Host memory is kept across requests (one request at a time): a fresh
    buffer of a bucket's size comes straight from mmap and is page-faulted in on every update, which costs more
    than receiving it. On a GPU, torch's caching allocator already reuses freed memory."""

    def __init__(self) -> None:
        self._host: torch.Tensor | None = None

    def take(self, size: int, device: torch.device) -> torch.Tensor:
        """``size`` bytes on ``device``, valid until the next call."""
        if device.type != "cpu":
            return torch.empty(size, dtype=torch.uint8, device=device)
        if self._host is None or self._host.numel() < size:
            self._host = None  # freed before the larger one is allocated
            self._host = torch.empty(size, dtype=torch.uint8)
        return self._host[:size]


def receive_broadcasts(
    group: dist.ProcessGroup,
    shapes: list[list[int]],
    dtypes: list[torch.dtype],
    device: torch.device,
    load_format: str | None = None,
    bucket_buffer: BucketBuffer | None = None,
) -> list[torch.Tensor]:
    """Receive the tensors of one request from rank 0: one broadcast per (shape, dtype), in order, into fresh
    tensors, or with ``flattened_bucket`` a single broadcast of all their bytes (into ``bucket_buffer`` if given;
    the tensors returned are then views of it)."""
    if load_format == FLATTENED_BUCKET:
        size = sum(math.prod(shape) * dtype.itemsize for shape, dtype in zip(shapes, dtypes, strict=True))
        flat = (bucket_buffer or BucketBuffer()).take(size, device)
        dist.broadcast(flat, src=0, group=group)
        tensors = tensors_from_bytes(flat, shapes, dtypes)
    else:
        tensors = [
            torch.empty(shape, dtype=dtype, device=device)
            for shape, dtype in zip(shapes, dtypes, strict=True)
        ]
        for tensor in tensors:
            dist.broadcast(tensor, src=0, group=group)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return tensors
