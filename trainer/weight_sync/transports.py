"""The three ways weights reach the engines. Each sender receives full (unsharded) tensors bucket by bucket, in
the order every rank produces them, and makes the matching SGLang requests.

- ``DistributedSender``: the trainer's rank 0 and every engine rank form one torch.distributed group (SGLang's
  ``/init_weights_update_group``: trainer rank 0, engine i at ranks ``1 + i·tp …``); per bucket it posts
  ``/update_weights_from_distributed`` (names, dtypes, shapes) and broadcasts from rank 0 the bucket's bytes as one
  uint8 tensor (``load_format="flattened_bucket"``) when every engine advertises that format, else each tensor.
- ``TensorSender``: colocated engines map the trainer's memory: each bucket is copied into one buffer per dtype
  (shared memory on CPU, a CUDA allocation on GPU), pickled as named views (file-backed shared-memory handles or
  CUDA IPC handles) and posted to ``/update_weights_from_tensor``.
- ``DiskSender``: each bucket becomes one safetensors shard of a Hugging Face directory on a path the engines
  share; ``/update_weights_from_disk`` then points every engine at it.
"""

from __future__ import annotations

import base64
import contextlib
import io
import logging
import shutil
import socket
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch
import torch.distributed as dist
import torch.multiprocessing as torch_mp

from services.core.process_group import init_weight_update_group
from trainer.weight_sync.engine_client import EngineClient

logger = logging.getLogger(__name__)

TRANSPORTS = ("distributed", "tensor", "disk")
# SGLang's load format for one broadcast per bucket; engines that take it list it in their server info.
FLATTENED_BUCKET = "flattened_bucket"

NamedTensors = list[tuple[str, torch.Tensor]]


def dtype_name(dtype: torch.dtype) -> str:
    """SGLang's dtype spelling (``"bfloat16"``), read back with ``getattr(torch, name)``."""
    return str(dtype).removeprefix("torch.")


def plan_buckets(sizes: Sequence[tuple[str, int]], limit_bytes: int) -> list[list[str]]:
    """Group parameter names, in order, into buckets of at most ``limit_bytes`` (``--update-weight-buffer-size``);
    a parameter larger than the limit gets a bucket of its own."""
    if limit_bytes <= 0:
        raise ValueError(f"--update-weight-buffer-size must be > 0, got {limit_bytes}")
    buckets: list[list[str]] = []
    used = 0
    for name, size in sizes:
        if not buckets or (buckets[-1] and used + size > limit_bytes):
            buckets.append([])
            used = 0
        buckets[-1].append(name)
        used += size
    return buckets


class WeightSender:
    """One push: ``begin(version)``, ``send(bucket)`` for every bucket, ``finish()``; reusable across pushes."""

    name = "base"

    def __init__(self, engines: Sequence[EngineClient]) -> None:
        self.engines = list(engines)
        self.version = ""
        self.bytes_sent = 0

    def begin(self, version: str) -> None:
        self.version = version
        self.bytes_sent = 0

    def send(self, bucket: NamedTensors) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        """Called once after the last bucket."""

    def close(self) -> None:
        for engine in self.engines:
            engine.close()

    def _on_all(self, pool: ThreadPoolExecutor, fn_name: str, **kwargs: Any) -> list[Future]:
        return [pool.submit(getattr(engine, fn_name), **kwargs) for engine in self.engines]


def _wait(futures: Sequence[Future]) -> list[Any]:
    return [f.result() for f in futures]


def local_address_towards(url: str) -> str:
    """The address of this host on the route to ``url``'s host (what engines dial back to)."""
    host = urlsplit(url).hostname or "127.0.0.1"
    if host in ("localhost", "127.0.0.1", "::1"):
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        # A UDP "connect" only picks the outgoing interface; nothing is sent.
        probe.connect((host, 9))
        return probe.getsockname()[0]


def distributed_load_format(server_infos: Sequence[dict[str, Any]]) -> str | None:
    """The ``load_format`` a push to all these engines can use: ``flattened_bucket`` when every engine's
    ``/get_server_info`` lists it in ``weight_update_load_formats``, else None (one broadcast per tensor, which
    every SGLang version reads)."""
    if server_infos and all(
        FLATTENED_BUCKET in (info.get("weight_update_load_formats") or ()) for info in server_infos
    ):
        return FLATTENED_BUCKET
    return None


def flatten_to_bytes(tensors: Sequence[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
    """One uint8 tensor holding every tensor's bytes back to back, in order, on their device (SGLang's
    ``FlattenedTensorBucket`` layout: any mix of dtypes, no padding); written into the front of ``out`` when given
    (a 1-D uint8 tensor at least that large)."""
    parts = [t.detach().contiguous().view(-1).view(torch.uint8) for t in tensors]
    if out is None:
        return torch.cat(parts)
    return torch.cat(parts, out=out[: sum(part.numel() for part in parts)])


class DistributedSender(WeightSender):
    """Broadcast from the trainer's rank 0 to every engine over a dedicated process group."""

    name = "distributed"

    def __init__(
        self,
        engines: Sequence[EngineClient],
        *,
        device: torch.device,
        gpus_per_engine: int = 1,
        master_port: int,
        timeout_s: float = 600.0,
        flattened_buckets: bool = True,
    ) -> None:
        """``flattened_buckets=False`` keeps one broadcast per tensor even where the engines take flattened ones."""
        super().__init__(engines)
        self.device = device
        self.backend = "nccl" if device.type == "cuda" else "gloo"
        self.gpus_per_engine = gpus_per_engine
        self.master_port = master_port
        self.timeout_s = timeout_s
        self.flattened_buckets = flattened_buckets
        self.group_name = f"slime_weights_{uuid.uuid4().hex[:8]}"
        self.group: dist.ProcessGroup | None = None
        # Chosen in connect(), from what every engine advertises.
        self.load_format: str | None = None
        # Host memory a flattened bucket is packed into, kept across buckets and pushes: a fresh buffer of that
        # size comes straight from mmap and is page-faulted in on every push (several times the cost of the copy
        # itself). On a GPU the caching allocator already reuses freed memory.
        self._host_buffer: torch.Tensor | None = None

    def connect(self) -> None:
        """Pick the load format, then create the group: every engine joins from its ``/init_weights_update_group``
        handler while rank 0 joins here; the HTTP calls return once the group exists."""
        world_size = 1 + len(self.engines) * self.gpus_per_engine
        master_address = local_address_towards(self.engines[0].base_url)
        with ThreadPoolExecutor(max_workers=len(self.engines)) as pool:
            if self.flattened_buckets:
                self.load_format = distributed_load_format(_wait(self._on_all(pool, "get_server_info")))
            futures = [
                pool.submit(
                    engine.init_weights_update_group,
                    master_address=master_address,
                    master_port=self.master_port,
                    rank_offset=1 + i * self.gpus_per_engine,
                    world_size=world_size,
                    group_name=self.group_name,
                    backend=self.backend,
                )
                for i, engine in enumerate(self.engines)
            ]
            try:
                self.group = init_weight_update_group(
                    master_address=master_address,
                    master_port=self.master_port,
                    rank=0,
                    world_size=world_size,
                    group_name=self.group_name,
                    backend=self.backend,
                    timeout_s=self.timeout_s,
                )
            finally:
                _wait(futures)
        if self.load_format == FLATTENED_BUCKET:
            how = "one broadcast per bucket (load_format flattened_bucket)"
        elif self.flattened_buckets:
            how = "one broadcast per tensor (not every engine advertises flattened_bucket)"
        else:
            how = "one broadcast per tensor (flattened buckets turned off)"
        logger.info(
            "weight-update group %s (%s, %d ranks) at %s:%d: %s",
            self.group_name,
            self.backend,
            world_size,
            master_address,
            self.master_port,
            how,
        )

    def send(self, bucket: NamedTensors) -> None:
        if self.group is None:
            self.connect()
        tensors = [t.to(self.device, non_blocking=True).contiguous() for _, t in bucket]
        # Packed on the sender's device (the GPU under NCCL): one copy, then one broadcast instead of one per tensor.
        payload = [self._flatten(tensors)] if self.load_format == FLATTENED_BUCKET else tensors
        with ThreadPoolExecutor(max_workers=len(self.engines)) as pool:
            futures = self._on_all(
                pool,
                "update_weights_from_distributed",
                names=[name for name, _ in bucket],
                dtypes=[dtype_name(t.dtype) for t in tensors],
                shapes=[list(t.shape) for t in tensors],
                group_name=self.group_name,
                weight_version=self.version,
                load_format=self.load_format,
            )
            try:
                handles = [dist.broadcast(t, src=0, group=self.group, async_op=True) for t in payload]
                for handle in handles:
                    handle.wait()
            finally:
                _wait(futures)
        self.bytes_sent += sum(t.numel() * t.element_size() for t in tensors)

    def _flatten(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        if self.device.type != "cpu":
            return flatten_to_bytes(tensors)
        size = sum(t.numel() * t.element_size() for t in tensors)
        if self._host_buffer is None or self._host_buffer.numel() < size:
            self._host_buffer = torch.empty(size, dtype=torch.uint8)
        # Rewritten only by the next bucket: send() returns after its broadcast has completed.
        return flatten_to_bytes(tensors, out=self._host_buffer)

    def close(self) -> None:
        self._host_buffer = None
        if self.group is not None:
            # Both sides at once, as the group was made: NCCL's teardown waits for its peers, so destroying ours
            # only after every engine answered (or the reverse) deadlocks.
            with ThreadPoolExecutor(max_workers=len(self.engines)) as pool:
                futures = [
                    pool.submit(engine.destroy_weights_update_group, self.group_name)
                    for engine in self.engines
                ]
                try:
                    dist.destroy_process_group(self.group)
                finally:
                    self.group = None
                    for future in futures:
                        with contextlib.suppress(Exception):
                            future.result()
        super().close()


@contextlib.contextmanager
def _file_system_sharing() -> Iterator[None]:
    # File-backed shared memory is named by a path, so an unrelated process (the engine) can map it; the default
    # file-descriptor strategy only works between a parent and its children.
    previous = torch_mp.get_sharing_strategy()
    torch_mp.set_sharing_strategy("file_system")
    try:
        yield
    finally:
        torch_mp.set_sharing_strategy(previous)


def flatten_by_dtype(
    bucket: NamedTensors, device: torch.device, buffers: dict[torch.dtype, torch.Tensor] | None = None
) -> tuple[list[torch.Tensor], NamedTensors]:
    """Copy a bucket into one contiguous buffer per dtype; returns the buffers used and the named views into them.

    ``buffers`` (dtype → 1-D tensor) are reused when large enough and replaced otherwise, so repeated pushes
    write into the same memory: the engine keeps its mapping of it, and nothing is allocated or faulted in again.
    """
    buffers = {} if buffers is None else buffers
    by_dtype: dict[torch.dtype, list[tuple[str, torch.Tensor]]] = {}
    for name, tensor in bucket:
        by_dtype.setdefault(tensor.dtype, []).append((name, tensor))
    used, views = [], []
    for dtype, items in by_dtype.items():
        numel = sum(t.numel() for _, t in items)
        buffer = buffers.get(dtype)
        if buffer is None or buffer.numel() < numel:
            buffer = torch.empty(numel, dtype=dtype, device=device)
            if device.type == "cpu":
                with _file_system_sharing():
                    buffer.share_memory_()
            buffers[dtype] = buffer
        offset = 0
        for name, tensor in items:
            n = tensor.numel()
            view = buffer[offset : offset + n].view(tensor.shape)
            view.copy_(tensor)
            views.append((name, view))
            offset += n
        used.append(buffer)
    return used, views


def serialize_named_tensors(named: NamedTensors) -> str:
    """Pickle ``[(name, tensor)]`` the way SGLang's ``MultiprocessingSerializer`` does (ForkingPickler + base64):
    storages travel as shared-memory or CUDA IPC handles, never as bytes."""
    buf = io.BytesIO()
    with _file_system_sharing():
        ForkingPickler(buf).dump(named)
    return base64.b64encode(buf.getvalue()).decode("ascii")


class TensorSender(WeightSender):
    """Hand colocated engines handles to this rank's memory (``/update_weights_from_tensor``)."""

    name = "tensor"

    def __init__(self, engines: Sequence[EngineClient], *, device: torch.device, tp_size: int = 1) -> None:
        super().__init__(engines)
        self.device = device
        self.tp_size = tp_size
        self._buffers: dict[torch.dtype, torch.Tensor] = {}

    def send(self, bucket: NamedTensors) -> None:
        if not self.engines:
            return
        buffers, views = flatten_by_dtype(bucket, self.device, self._buffers)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        payload = serialize_named_tensors(views)
        # Every tensor-parallel rank of an engine receives the same full tensors and loads its own slice.
        with ThreadPoolExecutor(max_workers=len(self.engines)) as pool:
            _wait(
                self._on_all(
                    pool,
                    "update_weights_from_tensor",
                    serialized_named_tensors=[payload] * self.tp_size,
                    weight_version=self.version,
                )
            )
        # The buffers are only rewritten after every engine has answered, i.e. has copied the weights in.
        self.bytes_sent += sum(t.numel() * t.element_size() for _, t in views)

    def close(self) -> None:
        self._buffers.clear()
        super().close()


class DiskSender(WeightSender):
    """Write a Hugging Face directory under ``directory`` (shared with the engines) and point them at it."""

    name = "disk"

    def __init__(
        self,
        engines: Sequence[EngineClient],
        *,
        directory: str,
        config: Any,
        architecture: str,
        tokenizer_source: str | None,
        num_buckets: int,
    ) -> None:
        super().__init__(engines)
        self.root = Path(directory)
        self.config = config
        self.architecture = architecture
        self.tokenizer_source = tokenizer_source
        self.num_buckets = num_buckets
        self._current: Path | None = None
        self._previous: Path | None = None
        self._weight_map: dict[str, str] = {}
        self._shard = 0
        self._total = 0

    def begin(self, version: str) -> None:
        super().begin(version)
        self._current = self.root / f"weights_v{version}"
        if self._current.exists():
            shutil.rmtree(self._current)
        self._current.mkdir(parents=True)
        self._weight_map = {}
        self._shard = 0
        self._total = 0

    def send(self, bucket: NamedTensors) -> None:
        from safetensors.torch import save_file

        self._shard += 1
        name = f"model-{self._shard:05d}-of-{self.num_buckets:05d}.safetensors"
        tensors = {n: t.detach().contiguous().cpu() for n, t in bucket}
        save_file(tensors, str(self._current / name), metadata={"format": "pt"})
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        self._total += size
        self.bytes_sent += size
        self._weight_map.update(dict.fromkeys(tensors, name))

    def finish(self) -> None:
        import json

        from trainer.checkpoint import write_hf_config_and_tokenizer

        (self._current / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": self._total}, "weight_map": self._weight_map}, indent=2)
        )
        write_hf_config_and_tokenizer(
            self._current,
            config=self.config,
            architecture=self.architecture,
            tokenizer_source=self.tokenizer_source,
        )
        with ThreadPoolExecutor(max_workers=max(len(self.engines), 1)) as pool:
            _wait(
                self._on_all(
                    pool,
                    "update_weights_from_disk",
                    model_path=str(self._current.resolve()),
                    weight_version=self.version,
                )
            )
        # Engines have loaded the new directory, so the one before it is no longer needed.
        if self._previous is not None and self._previous != self._current and self._previous.exists():
            shutil.rmtree(self._previous, ignore_errors=True)
        self._previous = self._current
