"""megatron-core's ``GPTModel`` built from a Hugging Face config: parallel state, the layer spec (megatron-core's
local modules with a packed-sequence SDPA core attention), one pipeline stage of it, Hugging Face weights in and
out (every stage's, gathered), forward passes on packed rows with vocabulary-parallel logits gathered and the
vocabulary padding cut off, and activation recomputation.

Imported only by the Megatron backend's ranks: it needs megatron-core.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state as mpu
from megatron.core import tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.attention import Attention
from megatron.core.transformer.module import Float16Module, MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock, TransformerBlockSubmodules

from trainer.backends.megatron_backend import context_parallel as cp
from trainer.backends.megatron_backend import convert
from trainer.backends.megatron_backend.config import (
    Architecture,
    pipeline_split_flags,
    recompute_config_kwargs,
)
from trainer.data_packing import PackedBatch

logger = logging.getLogger(__name__)


@dataclass
class ContextParallelSeqParams(PackedSeqParams):
    """A packed row's share on one context-parallel rank: the split, and each local token's rotary angles
    ``[T_local, head_dim]`` (the model is built without rotary embeddings: its own would number the local tokens
    from 0; :class:`PackedSDPAttention` applies these)."""

    split: cp.RowSplit | None = None
    rotary_angles: torch.Tensor | None = None


class PackedSDPAttention(MegatronModule):
    """Core attention for megatron-core's local spec through ``torch.nn.functional.scaled_dot_product_attention``
    (flash or memory-efficient kernels on GPU), causal, with packed (``thd``) rows attended one sequence at a
    time, as the torch backend does; megatron-core's own ``DotProductAttention`` refuses packed rows and
    materialises the full score matrix. Under context parallelism (:class:`ContextParallelSeqParams`) it applies
    the rotary embeddings and attends through :func:`context_parallel.attention`."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: Any = None,
        attention_type: str = "self",
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(config=config)
        self.scale = softmax_scale if softmax_scale is not None else config.kv_channels**-0.5

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # [s, b, heads, dim] -> [b, heads, s, dim]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=self.scale, enable_gqa=k.shape[1] != q.shape[1]
        )
        return out.permute(2, 0, 1, 3)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: Any = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> torch.Tensor:
        if attention_bias is not None:
            raise ValueError("PackedSDPAttention does not take an attention bias")
        if isinstance(packed_seq_params, ContextParallelSeqParams):
            angles = packed_seq_params.rotary_angles
            query = cp.apply_rotary(query, angles)
            key = cp.apply_rotary(key, angles)
            out = cp.attention(query, key, value, packed_seq_params.split, scale=self.scale)
            return out.reshape(out.shape[0], -1)
        if packed_seq_params is None:
            out = self._attend(query, key, value)  # [s, b, heads, dim]
            return out.reshape(out.shape[0], out.shape[1], -1)
        # thd: [t, heads, dim], sequences delimited by cu_seqlens.
        bounds = packed_seq_params.cu_seqlens_q.tolist()
        parts = [
            self._attend(query[s:e, None], key[s:e, None], value[s:e, None])[:, 0]
            for s, e in zip(bounds[:-1], bounds[1:], strict=True)
            if e > s
        ]
        out = torch.cat(parts)
        return out.reshape(out.shape[0], -1)


class RMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` built the way megatron-core builds its norms, usable under sequence parallelism.

    megatron-core's torch-norm fallback (no TransformerEngine or Apex) refuses ``--sequence-parallel``. Under it,
    each tensor-parallel rank normalises its own slice of the sequence, so the weight's gradient is partial per
    rank: the ``sequence_parallel`` mark has ``finalize_model_grads`` sum it over the tensor-parallel group (as it
    does for TransformerEngine's norms). The same module, weights and numerics as the fallback otherwise.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_: Any) -> None:
        super().__init__(hidden_size, eps=eps)
        self.weight.sequence_parallel = config.sequence_parallel


class ValueHead(MegatronModule):
    """A critic's ``hidden → 1`` head in place of ``GPTModel``'s output layer (Hugging Face token classification's
    ``score``). One output column cannot be split, so every tensor-parallel rank holds it whole and computes the
    same values; under sequence parallelism it first gathers the sequence (the backward keeps this rank's slice,
    since every rank's loss is the same)."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__(config=config)
        self.score = torch.nn.Linear(config.hidden_size, 1)

    def forward(self, hidden_states: torch.Tensor, *_: Any, **__: Any) -> tuple[torch.Tensor, None]:
        if self.config.sequence_parallel:
            hidden_states = tensor_parallel.gather_from_sequence_parallel_region(
                hidden_states, tensor_parallel_output_grad=False
            )
        return self.score(hidden_states), None


class CriticGPTModel(GPTModel):
    """``GPTModel`` whose output layer is a :class:`ValueHead`."""

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Any = None) -> Any:
        # megatron-core's language-model checkpoint logic expects a vocabulary output layer
        # (``output_layer.weight``) on the last stage; the value head is saved as any other replicated module.
        post_process, self.post_process = self.post_process, False
        try:
            return super().sharded_state_dict(prefix, sharded_offsets, metadata)
        finally:
            self.post_process = post_process


def megatron_available() -> bool:
    try:
        import megatron.core  # noqa: F401
    except ImportError:
        return False
    return True


def initialize_parallel(
    *,
    rank: int,
    world_size: int,
    master_addr: str,
    master_port: int,
    timeout_minutes: int,
    tp_size: int,
    pp_size: int,
    ep_size: int,
    seed: int,
    cp_size: int = 1,
) -> None:
    """The default (NCCL) process group and megatron-core's model-parallel groups."""
    if not dist.is_initialized():
        dist.init_process_group(
            "nccl",
            init_method=f"tcp://{master_addr}:{master_port}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(minutes=timeout_minutes),
        )
    mpu.initialize_model_parallel(
        tensor_model_parallel_size=tp_size,
        pipeline_model_parallel_size=pp_size,
        context_parallel_size=cp_size,
        expert_model_parallel_size=ep_size,
        distributed_timeout_minutes=timeout_minutes,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def stage_layers(config: TransformerConfig, pp_rank: int) -> range:
    """The global layer indices of pipeline stage ``pp_rank`` under ``config``'s split (megatron-core numbers its
    layers the same way)."""
    return convert.stage_layers(
        config.num_layers,
        config.pipeline_model_parallel_size,
        pp_rank,
        first=config.num_layers_in_first_pipeline_stage,
        last=config.num_layers_in_last_pipeline_stage,
    )


def transformer_config(arch: Architecture, args: Any) -> TransformerConfig:
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    pp = args.pipeline_model_parallel_size
    kwargs = arch.transformer_config_kwargs()
    if pp > 1:
        # Packed rows differ in length from one micro-batch to the next: the stages send each activation's shape
        # ahead of it (variable_seq_lengths), which megatron-core's allgather MoE dispatcher does not support.
        kwargs.update(variable_seq_lengths=True, moe_token_dispatcher_type="alltoall")
    first, last = pipeline_split_flags(args)
    stage_sizes = convert.stage_sizes(arch.shape.num_layers, pp, first=first, last=last)
    return TransformerConfig(
        **kwargs,
        activation_func=F.silu,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=pp,
        context_parallel_size=args.context_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        sequence_parallel=bool(args.sequence_parallel) and args.tensor_model_parallel_size > 1,
        params_dtype=dtype,
        bf16=args.bf16,
        pipeline_dtype=dtype,
        use_cpu_initialization=True,
        perform_initialization=False,
        deterministic_mode=bool(args.deterministic_mode),
        num_layers_in_first_pipeline_stage=first,
        num_layers_in_last_pipeline_stage=last,
        **recompute_config_kwargs(args, min(stage_sizes)),
        **({"moe_enable_routing_replay": True} if args.use_routing_replay else {}),
    )


@contextlib.contextmanager
def recomputing(model: torch.nn.Module, config: TransformerConfig) -> Iterator[None]:
    """Activation recomputation (``--recompute-granularity``) for the training forwards and backwards inside.

    megatron-core recomputes only in training mode: under ``full`` the transformer block checkpoints its layers,
    under ``selective`` each attention module its core attention. The model otherwise stays in eval mode (the RL
    log-probs of a training forward must equal those of a log-prob pass: no dropout, no training-only MoE
    behaviour), so only these modules switch to training mode, and back after."""
    if config.recompute_granularity is None:
        yield
        return
    kind = TransformerBlock if config.recompute_granularity == "full" else Attention
    modules = [m for m in model.modules() if isinstance(m, kind)]
    for module in modules:
        module.training = True
    try:
        yield
    finally:
        for module in modules:
            module.training = False


def _moe_without_transformer_engine() -> None:
    """megatron-core 0.16 leaves ``moe_utils.te_general_gemm`` undefined when TransformerEngine is missing, and its
    router's gating linear tests ``te_general_gemm is not None`` (NameError on every MoE forward); the name is meant
    to be None there, as later releases define it."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def build_gpt_model(arch: Architecture, config: TransformerConfig, *, value_head: bool = False) -> GPTModel:
    """This pipeline stage's bare ``GPTModel`` (not yet on the GPU, weights uninitialised): its layers, the
    embedding on the first stage, the final norm and output layer on the last; with ``value_head``, a critic."""
    s = arch.shape
    if s.num_experts:
        _moe_without_transformer_engine()
    spec = get_gpt_layer_local_spec(
        num_experts=s.num_experts or None,
        moe_grouped_gemm=False,
        qk_layernorm=s.qk_norm,
        normalization="RMSNorm",
    )
    layer = spec.submodules
    layer.self_attention.submodules.core_attention = PackedSDPAttention
    layer.input_layernorm = RMSNorm
    layer.pre_mlp_layernorm = RMSNorm
    if s.qk_norm:
        layer.self_attention.submodules.q_layernorm = RMSNorm
        layer.self_attention.submodules.k_layernorm = RMSNorm
    layers = stage_layers(config, mpu.get_pipeline_model_parallel_rank())
    block = TransformerBlockSubmodules(layer_specs=[spec] * len(layers), layer_norm=RMSNorm)
    last_stage = mpu.is_pipeline_last_stage()
    gpt = (CriticGPTModel if value_head else GPTModel)(
        config=config,
        transformer_layer_spec=block,
        vocab_size=s.padded_vocab_size,
        max_sequence_length=arch.max_position_embeddings,
        pre_process=mpu.is_pipeline_first_stage(),
        post_process=last_stage,
        parallel_output=True,
        share_embeddings_and_output_weights=s.tie_word_embeddings and not value_head,
        # Under context parallelism the attention applies rotary embeddings at each token's own position.
        position_embedding_type="rope" if config.context_parallel_size == 1 else "none",
        **_rotary_kwargs(arch),
    )
    if value_head and last_stage:
        gpt.output_layer = ValueHead(config)
    return gpt


def _rotary_kwargs(arch: Architecture) -> dict[str, Any]:
    return {
        "rotary_base": int(arch.rotary_base),
        "rope_scaling": arch.rope_scaling_factor is not None,
        "rope_scaling_factor": arch.rope_scaling_factor or 8.0,
    }


class RotaryAngles:
    """Rotary angles by position (``[positions, head_dim]``, the halves repeated as megatron-core lays them out),
    from megatron-core's own ``RotaryEmbedding`` configured as ``GPTModel`` configures it; for context
    parallelism, where the model is built without one."""

    def __init__(self, arch: Architecture, config: TransformerConfig, device: torch.device) -> None:
        from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

        kwargs = _rotary_kwargs(arch)
        rotary = RotaryEmbedding(
            kv_channels=config.kv_channels,
            rotary_percent=1.0,
            rotary_interleaved=config.rotary_interleaved,
            rotary_base=kwargs["rotary_base"],
            rope_scaling=kwargs["rope_scaling"],
            rope_scaling_factor=kwargs["rope_scaling_factor"],
            use_cpu_initialization=True,
        )
        if config.rotary_interleaved:
            raise ValueError("context parallelism supports non-interleaved rotary embeddings only")
        rotary.inv_freq = rotary.inv_freq.to(device)
        self.rotary = rotary
        self.table = torch.empty(0, device=device)

    def __call__(self, positions: torch.Tensor) -> torch.Tensor:
        needed = int(positions.max()) + 1 if positions.numel() else 0
        if needed > self.table.shape[0]:
            freqs = self.rotary.get_freqs_non_repeated(max(needed, 2 * self.table.shape[0]))
            self.table = torch.cat((freqs, freqs), dim=-1)
        return self.table[positions]


def wrap_fp16(model: GPTModel, config: TransformerConfig) -> torch.nn.Module:
    """bf16 params with fp32 outputs (megatron-core's ``Float16Module``), or the model itself in fp32."""
    return Float16Module(config, model) if config.bf16 else model


def unwrap(model: torch.nn.Module) -> GPTModel:
    while not isinstance(model, GPTModel):
        model = model.module
    return model


# ---------------------------------------------------------------------------------------- naming
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def global_name(name: str, shape: convert.ModelShape, config: TransformerConfig) -> str:
    """A parameter name of this rank's ``GPTModel`` → the full model's name (layers numbered across pipeline
    stages, experts across expert-parallel ranks)."""
    match = _LAYER.match(name)
    if match is not None and mpu.get_pipeline_model_parallel_world_size() > 1:
        offset = stage_layers(config, mpu.get_pipeline_model_parallel_rank()).start
        name = f"decoder.layers.{int(match.group(1)) + offset}.{match.group(2)}"
    marker = "mlp.experts.local_experts."
    if marker not in name:
        return name
    ep_size = mpu.get_expert_model_parallel_world_size()
    if ep_size == 1:
        return name
    head, tail = name.split(marker)
    local, rest = tail.split(".", 1)
    per_rank = shape.num_experts // ep_size
    return f"{head}{marker}{int(local) + mpu.get_expert_model_parallel_rank() * per_rank}.{rest}"


def _is_tied_copy(model: torch.nn.Module, name: str) -> bool:
    """Whether ``name`` (a name of this rank's ``GPTModel``) is the last pipeline stage's copy of tied word
    embeddings: megatron-core keeps it equal to the first stage's embedding (same start, gradients summed), so it
    is loaded from the embedding and not exported a second time."""
    gpt = unwrap(model)
    return name == "output_layer.weight" and gpt.share_embeddings_and_output_weights and not gpt.pre_process


def _tp_group_of(name: str) -> tuple[Any, int, int]:
    if ".mlp.experts." in name:
        return (
            mpu.get_expert_tensor_parallel_group(),
            mpu.get_expert_tensor_parallel_world_size(),
            mpu.get_expert_tensor_parallel_rank(),
        )
    return (
        mpu.get_tensor_model_parallel_group(),
        mpu.get_tensor_model_parallel_world_size(),
        mpu.get_tensor_model_parallel_rank(),
    )


# ------------------------------------------------------------------------------------ weights in/out
def local_shards(
    model: torch.nn.Module, mg_full: Mapping[str, torch.Tensor], shape: convert.ModelShape
) -> dict[str, torch.Tensor]:
    """This rank's shard of every parameter of ``model`` (keyed by ``model.named_parameters()`` names), cut from a
    full Megatron state dict."""
    out = {}
    gpt_prefix = _gpt_prefix(model)
    for name, param in model.named_parameters():
        local_name = name.removeprefix(gpt_prefix)
        if _is_tied_copy(model, local_name):
            mg_name = "embedding.word_embeddings.weight"
        else:
            mg_name = global_name(local_name, shape, unwrap(model).config)
        if mg_name not in mg_full:
            raise KeyError(f"Megatron parameter {mg_name!r} missing from the converted weights")
        _, tp_size, tp_rank = _tp_group_of(mg_name)
        shard = convert.split_for_tp(mg_name, mg_full[mg_name], tp_size)[tp_rank]
        if shard.shape != param.shape:
            raise ValueError(
                f"{mg_name}: converted shard {tuple(shard.shape)} != parameter {tuple(param.shape)}"
            )
        out[name] = shard
    return out


@torch.no_grad()
def load_hf_state(
    model: torch.nn.Module, hf_state: Mapping[str, torch.Tensor], shape: convert.ModelShape
) -> None:
    """Copy Hugging Face weights into this rank's parameters."""
    shards = local_shards(model, convert.hf_to_megatron(hf_state, shape), shape)
    for name, param in model.named_parameters():
        param.copy_(shards[name])


def _gpt_prefix(model: torch.nn.Module) -> str:
    prefix = ""
    while not isinstance(model, GPTModel):
        prefix += "module."
        model = model.module
    return prefix


@dataclass(frozen=True)
class FullParam:
    """One tensor of the full model as :func:`iter_full_megatron_params` yields it: Megatron name, full shape,
    dtype and the pipeline stage that holds it."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    stage: int


def _stage_params(
    model: torch.nn.Module, shape: convert.ModelShape
) -> Iterator[tuple[str, torch.nn.Parameter, list[str]]]:
    """This stage's parameters to export, each with its Megatron name and the full-model names it stands for (with
    expert parallelism, one per expert-parallel rank)."""
    prefix = _gpt_prefix(model)
    ep_size = mpu.get_expert_model_parallel_world_size()
    for name, param in model.named_parameters():
        local_name = name.removeprefix(prefix)
        if _is_tied_copy(model, local_name):
            continue
        mg_name = global_name(local_name, shape, unwrap(model).config)
        if ep_size > 1 and ".mlp.experts.local_experts." in mg_name:
            head, tail = mg_name.split("local_experts.")
            local, rest = tail.split(".", 1)
            per_rank = shape.num_experts // ep_size
            index = int(local) % per_rank
            yield (
                mg_name,
                param,
                [f"{head}local_experts.{index + r * per_rank}.{rest}" for r in range(ep_size)],
            )
        else:
            yield mg_name, param, [mg_name]


def full_param_plan(model: torch.nn.Module, shape: convert.ModelShape) -> list[FullParam]:
    """Every tensor of the full model, stage by stage, in the order :func:`iter_full_megatron_params` yields them;
    the same list on every rank (a collective over the pipeline group when there are several stages)."""
    mine = []
    for mg_name, param, names in _stage_params(model, shape):
        _, tp_size, _ = _tp_group_of(mg_name)
        full = list(param.shape)
        dim = convert.tp_split_dim(mg_name)
        if tp_size > 1 and dim is not None:
            full[dim] *= tp_size
        mine.extend((name, tuple(full), param.dtype) for name in names)
    pp_size = mpu.get_pipeline_model_parallel_world_size()
    if pp_size == 1:
        stages = [mine]
    else:
        stages = [None] * pp_size
        dist.all_gather_object(stages, mine, group=mpu.get_pipeline_model_parallel_group())
    return [
        FullParam(name, full, dtype, stage)
        for stage, entries in enumerate(stages)
        for name, full, dtype in entries
    ]


def _iter_stage_params(
    model: torch.nn.Module, shape: convert.ModelShape
) -> Iterator[tuple[str, torch.Tensor]]:
    """This stage's parameters in full (TP shards all-gathered; with expert parallelism, every rank's experts).
    A collective over the stage's tensor- and expert-parallel groups."""
    ep_size = mpu.get_expert_model_parallel_world_size()
    for mg_name, param, names in _stage_params(model, shape):
        group, tp_size, _ = _tp_group_of(mg_name)
        tensor = param.detach()
        if tp_size > 1 and convert.tp_split_dim(mg_name) is not None:
            shards = [torch.empty_like(tensor) for _ in range(tp_size)]
            dist.all_gather(shards, tensor.contiguous(), group=group)
            tensor = convert.gather_from_tp(mg_name, shards)
        if len(names) > 1:
            gathered = [torch.empty_like(tensor) for _ in range(ep_size)]
            dist.all_gather(gathered, tensor.contiguous(), group=mpu.get_expert_model_parallel_group())
            yield from zip(names, gathered, strict=True)
        else:
            yield mg_name, tensor


def iter_full_megatron_params(
    model: torch.nn.Module, shape: convert.ModelShape, plan: list[FullParam]
) -> Iterator[tuple[str, torch.Tensor]]:
    """Every parameter in full by Megatron name, in ``plan``'s order (see :func:`full_param_plan`). With pipeline
    stages, each tensor is broadcast from its stage to every stage. A collective: every rank of the model must
    iterate to the end."""
    pp_size = mpu.get_pipeline_model_parallel_world_size()
    if pp_size == 1:
        yield from _iter_stage_params(model, shape)
        return
    group = mpu.get_pipeline_model_parallel_group()
    stage_ranks = dist.get_process_group_ranks(group)
    stage = mpu.get_pipeline_model_parallel_rank()
    own = _iter_stage_params(model, shape)
    device = torch.device("cuda", torch.cuda.current_device())
    for entry in plan:
        if entry.stage == stage:
            name, tensor = next(own)
            if name != entry.name:
                raise RuntimeError(
                    f"pipeline stage {stage} yields {name!r} where its plan has {entry.name!r}"
                )
            tensor = tensor.contiguous()
        else:
            tensor = torch.empty(entry.shape, dtype=entry.dtype, device=device)
        dist.broadcast(tensor, src=stage_ranks[entry.stage], group=group)
        yield entry.name, tensor


def iter_hf_params(
    model: torch.nn.Module, shape: convert.ModelShape, plan: list[FullParam]
) -> Iterator[tuple[str, torch.Tensor]]:
    """Every parameter by its Hugging Face name, in full, vocabulary padding stripped (collective)."""
    for mg_name, tensor in iter_full_megatron_params(model, shape, plan):
        yield from convert.megatron_param_to_hf(mg_name, tensor, shape)


def megatron_param_sizes(plan: list[FullParam], dtype: torch.dtype | None) -> list[tuple[str, int]]:
    """(Megatron name, bytes in full, in ``dtype`` if given) of every tensor ``iter_full_megatron_params`` yields,
    in its order: what weight-sync buckets are planned from."""
    return [
        (entry.name, math.prod(entry.shape) * (entry.dtype if dtype is None else dtype).itemsize)
        for entry in plan
    ]


# ------------------------------------------------------------------------------------------ forward
def packed_seq_params(lengths: list[int], device: torch.device) -> PackedSeqParams:
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    cu = torch.tensor(bounds, dtype=torch.int32, device=device)
    longest = max(lengths)
    return PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest, max_seqlen_kv=longest
    )


def sequence_multiple(config: TransformerConfig) -> int:
    """What a packed row's length must divide by: under sequence parallelism every tensor-parallel rank takes an
    equal slice of it."""
    return config.tensor_model_parallel_size if config.sequence_parallel else 1


def forward_packed(model: torch.nn.Module, packed: PackedBatch, multiple: int) -> torch.Tensor:
    """This stage's output for one packed row, padded with a sequence of its own (attended to by nothing else) to
    a length that divides by ``multiple``: on the last pipeline stage the model's output ``[1, T', X]``, on the
    others the hidden states ``[T', 1, hidden]`` (this rank's slice of T' under sequence parallelism) sent on to
    the next stage, which reads them as its input instead of ``input_ids``."""
    input_ids, position_ids, lengths = packed.input_ids, packed.position_ids, list(packed.total_lengths)
    pad = -packed.num_tokens % multiple
    if pad:
        input_ids = F.pad(input_ids, (0, pad))
        filler = torch.arange(pad, dtype=position_ids.dtype, device=position_ids.device)
        position_ids = torch.cat([position_ids, filler.unsqueeze(0)], dim=1)
        lengths.append(pad)
    return model(
        input_ids=input_ids,
        position_ids=position_ids,
        attention_mask=None,
        packed_seq_params=packed_seq_params(lengths, input_ids.device),
    )


def split_packed(packed: PackedBatch, multiple: int, device: torch.device) -> cp.RowSplit:
    """This context-parallel rank's share of a packed row (its local length divides by ``multiple``)."""
    from megatron.core import parallel_state as mpu

    return cp.split_row(
        list(packed.total_lengths),
        cp_size=mpu.get_context_parallel_world_size(),
        cp_rank=mpu.get_context_parallel_rank(),
        group=mpu.get_context_parallel_group(),
        multiple=multiple,
        device=device,
    )


def forward_split(
    model: torch.nn.Module, packed: PackedBatch, split: cp.RowSplit, angles: RotaryAngles
) -> torch.Tensor:
    """This stage's output for this context-parallel rank's share of a packed row (as :func:`forward_packed`, on
    ``split.local_tokens`` tokens: the last stage's ``[1, T_local, X]``, else the hidden states)."""
    input_ids = cp.local_part(packed.input_ids[0], split)
    lengths = [2 * c.length for c in split.chunks[::2]]
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=input_ids.device)
    params = ContextParallelSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu,
        cu_seqlens_kv=cu,
        max_seqlen_q=max(lengths),
        max_seqlen_kv=max(lengths),
        split=split,
        rotary_angles=angles(split.positions),
    )
    return model(
        input_ids=input_ids.unsqueeze(0),
        position_ids=split.positions.unsqueeze(0),
        attention_mask=None,
        packed_seq_params=params,
    )


def forward_logits(
    model: torch.nn.Module, packed: PackedBatch, *, vocab_size: int, multiple: int = 1
) -> torch.Tensor:
    """Logits ``[T, vocab_size]`` (float32) of one packed row: vocabulary-parallel shards all-gathered, padding
    rows of the vocabulary and the filler tokens of ``multiple`` dropped."""
    logits = tensor_parallel.gather_from_tensor_model_parallel_region(forward_packed(model, packed, multiple))
    return logits[0, : packed.num_tokens, :vocab_size].float()


def forward_values(model: torch.nn.Module, packed: PackedBatch, *, multiple: int = 1) -> torch.Tensor:
    """A critic's values ``[T, 1]`` (float32) of one packed row."""
    return forward_packed(model, packed, multiple)[0, : packed.num_tokens].float()
