"""Hugging Face models for the torch backend: loading the policy and the critic, FSDP2 sharding, forward passes on
packed rows, and host-memory weight copies (reference model, old actor) swapped into the live model on demand.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from trainer.data_packing import PackedBatch, Segment

logger = logging.getLogger(__name__)

PACKED_ATTENTION = "slime_packed_sdpa"


def packed_sdpa_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    packed_seq_bounds: tuple[int, ...] | None = None,
    packed_segments: tuple[Segment, ...] | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention over a packed row through transformers' own SDPA path.

    With ``packed_seq_bounds`` (the cumulative sequence offsets ``(0, L_0, L_0 + L_1, …)``) each sequence attends
    causally to itself only. With ``packed_segments`` (see :func:`trainer.data_packing.pack_shared_prompts`) a
    segment that names a prefix attends to all of that prefix, then causally to itself: one prompt, stored once,
    serves every response of its group.

    A single block-diagonal T×T mask would make attention quadratic in the whole row and keep SDPA off its
    flash kernels; here the cost is Σ L_i² (plus Σ L_i·P_i for continuations), sequences of one length (a GRPO
    group's prompts often are) share one kernel launch, and all continuations share one masked call. A row of at
    most ``DENSE_ROW_TOKENS`` tokens is attended in one masked call over its blocks, stacked (``_block_plan``).
    ``query`` is ``[1, heads, T, head_dim]`` and the result ``[1, T, heads, head_dim]``, as transformers' SDPA
    returns it.
    """
    if query.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        # CPU autocast would run SDPA in bf16, whose flash backward is several times slower on CPU than float32's;
        # the projections around it keep their bf16 matrix products.
        if attention_mask is not None and attention_mask.is_floating_point():
            attention_mask = attention_mask.float()
        with torch.autocast("cpu", enabled=False):
            out, _ = packed_sdpa_attention(
                module, query.float(), key.float(), value.float(), attention_mask,
                packed_seq_bounds, packed_segments, **kwargs,
            )  # fmt: skip
        return out.to(torch.get_autocast_dtype("cpu")), None
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if packed_segments is None and packed_seq_bounds is not None:
        packed_segments = _segments_of_bounds(packed_seq_bounds)
    if packed_segments is None or attention_mask is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    total = query.shape[2]
    if total <= DENSE_ROW_TOKENS and len(packed_segments) > 1:
        blocks = _block_plan(packed_segments, query.device)
        if blocks is None:
            return sdpa_attention_forward(
                module, query, key, value, _row_mask(packed_segments, query.device), **kwargs
            )
        q, k, v = (_gather_rows(t, blocks.index) for t in (query, key, value))
        attended = sdpa_attention_forward(module, q, k, v, blocks.mask, **kwargs)[0]
        return _scatter_rows([attended], blocks.source), None
    plan = _attention_plan(packed_segments, query.device)
    if plan.whole_row:
        return sdpa_attention_forward(module, query, key, value, None, **kwargs)
    pieces = []
    for positions in plan.roots:
        q, k, v = (_gather_rows(t, positions) for t in (query, key, value))
        pieces.append(sdpa_attention_forward(module, q, k, v, None, **kwargs)[0])
    if plan.continuations is not None:
        cont = plan.continuations
        q = _gather_rows(query, cont.query_index)
        k, v = (_gather_rows(t, cont.key_index) for t in (key, value))
        pieces.append(sdpa_attention_forward(module, q, k, v, cont.mask, **kwargs)[0])
    return _scatter_rows(pieces, plan.source), None


def _gather_rows(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``[1, heads, T, head_dim]`` to ``[n, heads, L, head_dim]``: the rows ``index`` (``[n, L]``) names.

    ``index_select`` rather than advanced indexing: its backward is an ``index_add``, where advanced indexing's is
    an accumulating ``index_put``, several times slower on CPU."""
    return t[0].index_select(1, index.reshape(-1)).unflatten(1, index.shape).transpose(0, 1)


def _scatter_rows(pieces: list[torch.Tensor], source: torch.Tensor) -> torch.Tensor:
    """The ``[1, T, heads, head_dim]`` row from SDPA's outputs (each ``[n, L, heads, head_dim]``): row ``r`` is
    element ``source[r]`` of the pieces flattened end to end (padding positions are never picked)."""
    flat = [p.reshape(-1, *p.shape[2:]) for p in pieces]
    flat = flat[0] if len(flat) == 1 else torch.cat(flat)
    return flat.index_select(0, source).unsqueeze(0)


def _source_of(destinations: torch.Tensor, total: int) -> torch.Tensor:
    """For each of ``total`` row positions, where it lies in ``destinations`` (the row position of every element of
    the flattened pieces, -1 for padding). Every row position must appear exactly once."""
    real = destinations >= 0
    if int(real.sum()) != total or torch.unique(destinations[real]).numel() != total:
        raise ValueError("packed segments must cover every position of the row exactly once")
    source = torch.empty(total, dtype=torch.long)
    source[destinations[real]] = torch.arange(destinations.numel())[real]
    return source


# A row this short is attended in one masked call over its blocks (``_block_plan``): the per-length gathers and
# scatters of the longer rows' plan would cost more than the attention that the padding wastes.
DENSE_ROW_TOKENS = 512


@functools.lru_cache(maxsize=64)
def _row_mask(segments: tuple[Segment, ...], device: torch.device) -> torch.Tensor:
    """``[1, 1, T, T]``: True where row i may attend to row j (same segment and j ≤ i, or j in i's prefix)."""
    total = max(start + length for start, length, _, _ in segments)
    segment_of = torch.full((total,), -1, dtype=torch.long)
    prefix_start = torch.full((total,), -1, dtype=torch.long)
    prefix_end = torch.full((total,), -1, dtype=torch.long)
    for k, (start, length, p_start, p_length) in enumerate(segments):
        segment_of[start : start + length] = k
        if p_length:
            prefix_start[start : start + length] = p_start
            prefix_end[start : start + length] = p_start + p_length
    rows, cols = torch.arange(total)[:, None], torch.arange(total)[None, :]
    own = (segment_of[:, None] == segment_of[None, :]) & (cols <= rows)
    prefix = (cols >= prefix_start[:, None]) & (cols < prefix_end[:, None])
    return (own | prefix)[None, None].to(device)


@dataclass(frozen=True)
class _Blocks:
    """A short row's attention as one masked call over its blocks (a root segment and the continuations whose
    prefix lies in it: a GRPO group's prompt and responses), padded to the longest: the masked call then costs
    Σ blocks × longest² instead of the whole row squared."""

    index: torch.Tensor  # [B, L] row positions of each block (padding repeats the block's first position)
    mask: torch.Tensor  # [B, 1, L, L] True where a query may attend
    source: torch.Tensor  # [T] for each row position, its place in the flattened [B, L] output


@functools.lru_cache(maxsize=64)
def _block_plan(segments: tuple[Segment, ...], device: torch.device) -> _Blocks | None:
    """The row's blocks, or None when it is one block (the row's own mask is then as small)."""
    roots = sorted((start, length) for start, length, _, p_length in segments if p_length == 0)
    members: dict[int, list[tuple[int, int]]] = {start: [] for start, _ in roots}
    for start, length, p_start, p_length in segments:
        if p_length == 0:
            members[start].append((start, length))
            continue
        owner = next((r for r, n in roots if r <= p_start and p_start + p_length <= r + n), None)
        if owner is None:
            return None  # a prefix that is no root's: keep the row mask
        members[owner].append((start, length))
    if len(members) < 2:
        return None
    positions = [
        torch.cat([torch.arange(start, start + length) for start, length in sorted(parts)])
        for parts in members.values()
    ]
    longest = max(len(p) for p in positions)
    index = torch.zeros(len(positions), longest, dtype=torch.long)
    valid = torch.zeros(len(positions), longest, dtype=torch.bool)
    for b, p in enumerate(positions):
        index[b, : len(p)] = p
        index[b, len(p) :] = p[0]
        valid[b, : len(p)] = True
    row_mask = _row_mask(segments, torch.device("cpu"))[0, 0]
    mask = row_mask[index[:, :, None], index[:, None, :]] & valid[:, None, :]
    # A padding query attends to its block's first key, so that its (discarded) softmax stays finite.
    mask[:, :, 0] |= ~valid
    total = max(start + length for start, length, _, _ in segments)
    return _Blocks(
        index=index.to(device),
        mask=mask[:, None].to(device),
        source=_source_of(torch.where(valid, index, -1).reshape(-1), total).to(device),
    )


@dataclass(frozen=True)
class _Continuations:
    """Every continuation segment of a row in one masked attention call, padded to the longest."""

    query_index: torch.Tensor  # [n, Lq] row positions of the queries (padding repeats position 0)
    key_index: torch.Tensor  # [n, Lk] the prefix's positions, then the segment's own
    mask: torch.Tensor  # [n, 1, Lq, Lk] True where a query may attend


@dataclass(frozen=True)
class _AttentionPlan:
    whole_row: bool  # one root segment covering the row: plain causal attention
    roots: list[torch.Tensor]  # per length, the [n, L] positions of the root segments of that length
    continuations: _Continuations | None
    # [T] for each row position, its place in the attention outputs flattened end to end (roots, continuations)
    source: torch.Tensor | None


def _segments_of_bounds(bounds: tuple[int, ...]) -> tuple[Segment, ...]:
    return tuple((s, e - s, s, 0) for s, e in zip(bounds[:-1], bounds[1:], strict=True) if e > s)


@functools.lru_cache(maxsize=64)
def _attention_plan(segments: tuple[Segment, ...], device: torch.device) -> _AttentionPlan:
    """The index tensors of a row's attention: every layer of a forward, and every pass over the same
    micro-batch, asks for the same ones."""
    starts_by_length: dict[int, list[int]] = {}
    continuations = []
    for start, length, prefix_start, prefix_length in segments:
        if prefix_length == 0:
            starts_by_length.setdefault(length, []).append(start)
        else:
            continuations.append((start, length, prefix_start, prefix_length))
    roots = [
        torch.tensor(starts, device=device)[:, None] + torch.arange(length, device=device)
        for length, starts in starts_by_length.items()
    ]
    whole_row = not continuations and len(roots) == 1 and roots[0].shape[0] == 1 and segments[0][0] == 0
    total = max(start + length for start, length, _, _ in segments)
    root_rows = [r.reshape(-1).cpu() for r in roots]
    if not continuations:
        source = None if whole_row else _source_of(torch.cat(root_rows), total).to(device)
        return _AttentionPlan(whole_row, roots, None, source)
    q_len = max(length for _, length, _, _ in continuations)
    p_len = max(prefix for _, _, _, prefix in continuations)
    n = len(continuations)
    query_index = torch.zeros(n, q_len, dtype=torch.long)
    key_index = torch.zeros(n, p_len + q_len, dtype=torch.long)
    mask = torch.zeros(n, 1, q_len, p_len + q_len, dtype=torch.bool)
    valid = torch.zeros(n, q_len, dtype=torch.bool)
    causal = torch.ones(q_len, q_len, dtype=torch.bool).tril()
    for j, (start, length, prefix_start, prefix_length) in enumerate(continuations):
        query_index[j, :length] = torch.arange(start, start + length)
        key_index[j, :prefix_length] = torch.arange(prefix_start, prefix_start + prefix_length)
        key_index[j, p_len : p_len + length] = torch.arange(start, start + length)
        mask[j, 0, :length, :prefix_length] = True
        mask[j, 0, :length, p_len : p_len + length] = causal[:length, :length]
        # A padding query attends to one key, so that its (discarded) softmax stays finite in both passes.
        mask[j, 0, length:, 0] = True
        valid[j, :length] = True
    destinations = torch.cat([*root_rows, torch.where(valid, query_index, -1).reshape(-1)])
    return _AttentionPlan(
        whole_row,
        roots,
        _Continuations(
            query_index=query_index.to(device), key_index=key_index.to(device), mask=mask.to(device)
        ),
        _source_of(destinations, total).to(device),
    )


def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED_ATTENTION, packed_sdpa_attention)


def load_policy(path: str, *, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """``AutoModelForCausalLM`` from a Hugging Face directory, without dropout (RL log-probs must be reproducible)."""
    from transformers import AutoModelForCausalLM

    _register_attention()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=PACKED_ATTENTION)
    return _prepare(model, device)


def load_critic(path: str, *, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """The critic: the policy's transformer with a ``hidden → 1`` value head (``AutoModelForTokenClassification``
    with one label), initialised from a causal-LM or token-classification directory."""
    from transformers import AutoModelForTokenClassification

    _register_attention()
    model = AutoModelForTokenClassification.from_pretrained(
        path, dtype=dtype, num_labels=1, attn_implementation=PACKED_ATTENTION
    )
    return _prepare(model, device)


def _prepare(model: nn.Module, device: torch.device) -> nn.Module:
    model.config.use_cache = False
    # eval() only switches dropout off; gradients flow as usual.
    model.eval()
    return model.to(device)


def apply_fsdp(model: nn.Module, mesh, *, param_dtype: torch.dtype | None) -> nn.Module:
    """Shard every decoder layer, then the root (embeddings, final norm, head), with FSDP2 ``fully_shard``."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    layers = _decoder_layers(model)
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp_policy)
    fully_shard(model, mesh=mesh, mp_policy=mp_policy)
    return model


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    base = getattr(model, "base_model", model)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise ValueError(
            f"{type(model).__name__}: no decoder layers found to shard (expected base_model.layers)"
        )
    return list(layers)


def architecture_name(model: nn.Module) -> str:
    """The Hugging Face class name of a (possibly FSDP-wrapped) model, for ``config.architectures``."""
    for cls in type(model).__mro__:
        if cls.__module__.startswith("transformers."):
            return cls.__name__
    return type(model).__name__


def forward_logits(model: nn.Module, packed: PackedBatch) -> torch.Tensor:
    """Logits ``[T, V]`` (or values ``[T, 1]``) of one packed row."""
    out = model(
        input_ids=packed.input_ids,
        position_ids=packed.position_ids,
        use_cache=False,
        packed_segments=packed.segments,
    )
    return out.logits[0]


def reshard(model: nn.Module) -> None:
    """Return FSDP2 modules to their sharded parameters (the root stays unsharded after a forward without backward)."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def named_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """Parameters by their Hugging Face name, sharded (FSDP2 keeps names; tied weights appear once)."""
    reshard(model)
    yield from model.named_parameters()


def local_tensor(param: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a parameter (the whole tensor when it is not sharded)."""
    return param.to_local() if isinstance(param, DTensor) else param


def full_tensor(param: torch.Tensor) -> torch.Tensor:
    """The whole parameter; a collective over the mesh for a sharded one, so every rank must call it."""
    return param.full_tensor() if isinstance(param, DTensor) else param


@dataclass
class TensorStore:
    """Host-memory copies of this rank's parameter shards, by name (pinned when training on CUDA)."""

    tensors: dict[str, torch.Tensor]

    @classmethod
    def snapshot(cls, model: nn.Module) -> TensorStore:
        tensors = {}
        for name, param in named_parameters(model):
            local = local_tensor(param.detach())
            host = torch.empty(local.shape, dtype=local.dtype, pin_memory=local.is_cuda)
            host.copy_(local)
            tensors[name] = host
        return cls(tensors)

    @classmethod
    def from_full_state(cls, model: nn.Module, state: dict[str, torch.Tensor]) -> TensorStore:
        """This rank's shards of a full (unsharded) state dict, e.g. a reference model read from disk."""
        tensors = {}
        for name, param in named_parameters(model):
            if name not in state:
                raise KeyError(f"weights {name!r} missing from the loaded state (have {len(state)} tensors)")
            full = state[name].to(param.dtype)
            if isinstance(param, DTensor):
                # Every rank holds the full tensor, so each cuts its own shard without communication.
                full = distribute_tensor(
                    full.to(param.device), param.device_mesh, param.placements, src_data_rank=None
                ).to_local()
            host = torch.empty(full.shape, dtype=full.dtype, pin_memory=param.is_cuda)
            host.copy_(full)
            tensors[name] = host
        return cls(tensors)

    def update_from(self, model: nn.Module) -> None:
        for name, param in named_parameters(model):
            self.tensors[name].copy_(local_tensor(param.detach()))

    def copy_from(self, other: TensorStore) -> None:
        for name, tensor in self.tensors.items():
            tensor.copy_(other.tensors[name])

    @torch.no_grad()
    def load_into(self, model: nn.Module) -> None:
        for name, param in named_parameters(model):
            local_tensor(param).copy_(self.tensors[name], non_blocking=True)
        if any(t.is_pinned() for t in self.tensors.values()):
            torch.cuda.synchronize()
