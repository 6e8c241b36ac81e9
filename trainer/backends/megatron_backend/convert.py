"""Hugging Face ⇄ Megatron-core weights for Qwen2, Qwen3, Llama and Qwen3-MoE, as pure torch functions.

Megatron names are those of megatron-core's ``GPTModel`` built with the local (non-TransformerEngine) layer spec::

    embedding.word_embeddings.weight                         [padded_vocab, h]  vocab rows padded with zeros
    decoder.layers.L.input_layernorm.weight
    decoder.layers.L.self_attention.linear_qkv.weight|bias   per KV group g: [q heads of g; k_g; v_g] stacked
    decoder.layers.L.self_attention.q_layernorm.weight       Qwen3's per-head q/k RMSNorm
    decoder.layers.L.self_attention.k_layernorm.weight
    decoder.layers.L.self_attention.linear_proj.weight
    decoder.layers.L.pre_mlp_layernorm.weight
    decoder.layers.L.mlp.linear_fc1.weight                   [gate; up] (SwiGLU)
    decoder.layers.L.mlp.linear_fc2.weight
    decoder.layers.L.mlp.router.weight                       MoE: router, and experts.local_experts.E.linear_fc1/2
    decoder.final_layernorm.weight
    output_layer.weight                                      absent when embeddings are tied
    output_layer.score.{weight,bias}        score.*           a critic's value head (token classification)

Tensor parallelism splits column-parallel weights (QKV by whole KV groups, each rank's fc1 holding its own
``[gate_r; up_r]``, embeddings and the output layer by vocab rows) along dim 0 and row-parallel ones
(``linear_proj``, ``linear_fc2``) along dim 1; norms and the router are replicated. Every function here only
reshapes, concatenates and slices, so a round trip is bitwise exact.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3", "llama", "qwen3_moe")

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(linear_fc1|linear_fc2)\.weight$")

# Megatron's local-spec norm names and the names megatron-core's TransformerEngine spec fuses them into.
_TE_NORM_NAMES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}


def padded_vocab_size(
    vocab_size: int, *, make_divisible_by: int = 128, tp_size: int = 1, padded: int | None = None
) -> int:
    """Megatron's vocabulary padding: ``--padded-vocab-size`` when given, else the smallest multiple of
    ``--make-vocab-size-divisible-by × tensor-parallel size`` that holds ``vocab_size``."""
    if padded is not None:
        if padded < vocab_size:
            raise ValueError(f"--padded-vocab-size {padded} is smaller than the vocabulary ({vocab_size})")
        return padded
    multiple = max(make_divisible_by, 1) * tp_size
    return int(math.ceil(vocab_size / multiple) * multiple)


# A critic's value head (``hidden → 1``, replicated over TP): Hugging Face name → Megatron name.
VALUE_HEAD = {"score.weight": "output_layer.score.weight", "score.bias": "output_layer.score.bias"}
_VALUE_HEAD_TO_HF = {mg: hf for hf, mg in VALUE_HEAD.items()}


@dataclass(frozen=True)
class ModelShape:
    """What the conversion needs to know of a model: sizes, biases, norms, tying and the padded vocabulary."""

    model_type: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    padded_vocab_size: int
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    num_experts: int = 0
    moe_intermediate_size: int = 0

    @classmethod
    def from_hf_config(
        cls,
        config: Any,
        *,
        padded_vocab: int | None = None,
        make_vocab_size_divisible_by: int = 128,
        tp_size: int = 1,
    ) -> ModelShape:
        """From a ``transformers`` config object or its ``config.json`` dict."""
        get = (
            config.get
            if isinstance(config, Mapping)
            else (lambda key, default=None: getattr(config, key, default))
        )
        model_type = get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type {model_type!r} has no Megatron conversion; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        heads = int(get("num_attention_heads"))
        hidden = int(get("hidden_size"))
        head_dim = get("head_dim") or hidden // heads
        vocab = int(get("vocab_size"))
        # transformers 5 spells num_experts num_local_experts.
        experts = get("num_experts") or get("num_local_experts") or 0
        num_experts = int(experts) if model_type == "qwen3_moe" else 0
        if get("attention_bias", False) or get("mlp_bias", False):
            # Megatron biases either only the QKV projection (Qwen2) or every linear layer.
            raise ValueError(
                f"{model_type}: attention_bias / mlp_bias models have no Megatron conversion here"
            )
        return cls(
            model_type=model_type,
            num_layers=int(get("num_hidden_layers")),
            hidden_size=hidden,
            num_attention_heads=heads,
            num_key_value_heads=int(get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            intermediate_size=int(get("intermediate_size")),
            vocab_size=vocab,
            padded_vocab_size=padded_vocab_size(
                vocab, make_divisible_by=make_vocab_size_divisible_by, tp_size=tp_size, padded=padded_vocab
            ),
            tie_word_embeddings=bool(get("tie_word_embeddings", False)),
            # Qwen2 has q/k/v biases; Qwen3 has none but normalises q and k.
            qkv_bias=model_type == "qwen2",
            qk_norm=model_type in ("qwen3", "qwen3_moe"),
            num_experts=num_experts,
            moe_intermediate_size=int(get("moe_intermediate_size") or 0),
        )

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads


# ------------------------------------------------------------------------------------------- QKV and fc1
def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: ModelShape) -> torch.Tensor:
    """HF q/k/v projections (weights ``[out, h]`` or biases ``[out]``) → Megatron's grouped ``linear_qkv``."""
    groups, per, dim = shape.num_key_value_heads, shape.heads_per_group, shape.head_dim
    rest = q.shape[1:]
    fused = torch.cat(
        [
            q.reshape(groups, per * dim, *rest),
            k.reshape(groups, dim, *rest),
            v.reshape(groups, dim, *rest),
        ],
        dim=1,
    )
    return fused.reshape(groups * (per + 2) * dim, *rest)


def split_qkv(qkv: torch.Tensor, shape: ModelShape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Megatron's ``linear_qkv`` (weight or bias) → HF q, k, v."""
    groups, per, dim = shape.num_key_value_heads, shape.heads_per_group, shape.head_dim
    rest = qkv.shape[1:]
    grouped = qkv.reshape(groups, (per + 2) * dim, *rest)
    q, k, v = torch.split(grouped, [per * dim, dim, dim], dim=1)
    return (
        q.reshape(groups * per * dim, *rest),
        k.reshape(groups * dim, *rest),
        v.reshape(groups * dim, *rest),
    )


def _pad_vocab(weight: torch.Tensor, shape: ModelShape) -> torch.Tensor:
    extra = shape.padded_vocab_size - weight.shape[0]
    if extra < 0:
        raise ValueError(
            f"vocabulary of {weight.shape[0]} rows exceeds the padded size {shape.padded_vocab_size}"
        )
    if extra == 0:
        return weight
    return torch.cat([weight, weight.new_zeros(extra, *weight.shape[1:])])


# ---------------------------------------------------------------------------------------- HF → Megatron
def hf_to_megatron(hf: Mapping[str, torch.Tensor], shape: ModelShape) -> dict[str, torch.Tensor]:
    """A full (unsharded) Megatron state dict from a Hugging Face one."""
    out: dict[str, torch.Tensor] = {
        "embedding.word_embeddings.weight": _pad_vocab(hf["model.embed_tokens.weight"], shape),
        "decoder.final_layernorm.weight": hf["model.norm.weight"],
    }
    if not shape.tie_word_embeddings and "lm_head.weight" in hf:
        out["output_layer.weight"] = _pad_vocab(hf["lm_head.weight"], shape)
    # A critic's value head (a token-classification checkpoint's ``score``), replicated over TP.
    out.update({mg: hf[key] for key, mg in VALUE_HEAD.items() if key in hf})
    for layer in range(shape.num_layers):
        src, dst = f"model.layers.{layer}.", f"decoder.layers.{layer}."
        attn = src + "self_attn."
        out[dst + "input_layernorm.weight"] = hf[src + "input_layernorm.weight"]
        out[dst + "pre_mlp_layernorm.weight"] = hf[src + "post_attention_layernorm.weight"]
        out[dst + "self_attention.linear_qkv.weight"] = fuse_qkv(
            hf[attn + "q_proj.weight"], hf[attn + "k_proj.weight"], hf[attn + "v_proj.weight"], shape
        )
        if shape.qkv_bias:
            out[dst + "self_attention.linear_qkv.bias"] = fuse_qkv(
                hf[attn + "q_proj.bias"], hf[attn + "k_proj.bias"], hf[attn + "v_proj.bias"], shape
            )
        out[dst + "self_attention.linear_proj.weight"] = hf[attn + "o_proj.weight"]
        if shape.qk_norm:
            out[dst + "self_attention.q_layernorm.weight"] = hf[attn + "q_norm.weight"]
            out[dst + "self_attention.k_layernorm.weight"] = hf[attn + "k_norm.weight"]
        if shape.num_experts:
            out[dst + "mlp.router.weight"] = hf[src + "mlp.gate.weight"]
            for e in range(shape.num_experts):
                ex = f"{src}mlp.experts.{e}."
                mg = f"{dst}mlp.experts.local_experts.{e}."
                out[mg + "linear_fc1.weight"] = torch.cat(
                    [hf[ex + "gate_proj.weight"], hf[ex + "up_proj.weight"]]
                )
                out[mg + "linear_fc2.weight"] = hf[ex + "down_proj.weight"]
        else:
            mlp = src + "mlp."
            out[dst + "mlp.linear_fc1.weight"] = torch.cat(
                [hf[mlp + "gate_proj.weight"], hf[mlp + "up_proj.weight"]]
            )
            out[dst + "mlp.linear_fc2.weight"] = hf[mlp + "down_proj.weight"]
    return out


# ---------------------------------------------------------------------------------------- Megatron → HF
def megatron_param_to_hf(
    name: str, tensor: torch.Tensor, shape: ModelShape
) -> list[tuple[str, torch.Tensor]]:
    """One full (TP-gathered) Megatron parameter → its Hugging Face parameters, vocabulary padding stripped.

    Every Megatron parameter maps on its own, so weight sync can convert bucket by bucket."""
    if name == "embedding.word_embeddings.weight":
        return [("model.embed_tokens.weight", tensor[: shape.vocab_size])]
    if name == "output_layer.weight":
        return [("lm_head.weight", tensor[: shape.vocab_size])]
    if name in _VALUE_HEAD_TO_HF:
        return [(_VALUE_HEAD_TO_HF[name], tensor)]
    if name == "decoder.final_layernorm.weight":
        return [("model.norm.weight", tensor)]
    match = _LAYER.match(name)
    if match is None:
        raise KeyError(f"no Hugging Face name for Megatron parameter {name!r}")
    layer, rest = match.groups()
    rest = {v: k for k, v in _TE_NORM_NAMES.items()}.get(rest, rest)
    hf = f"model.layers.{layer}."
    if rest in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        kind = rest.rsplit(".", 1)[1]
        q, k, v = split_qkv(tensor, shape)
        return [(f"{hf}self_attn.{p}_proj.{kind}", t) for p, t in zip("qkv", (q, k, v), strict=True)]
    simple = {
        "input_layernorm.weight": "input_layernorm.weight",
        "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
        "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
        "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
        "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
        "mlp.linear_fc2.weight": "mlp.down_proj.weight",
        "mlp.router.weight": "mlp.gate.weight",
    }
    if rest in simple:
        return [(hf + simple[rest], tensor)]
    if rest == "mlp.linear_fc1.weight":
        gate, up = tensor.chunk(2, dim=0)
        return [(hf + "mlp.gate_proj.weight", gate), (hf + "mlp.up_proj.weight", up)]
    expert = _EXPERT.match(rest)
    if expert is not None:
        e, which = expert.groups()
        if which == "linear_fc2":
            return [(f"{hf}mlp.experts.{e}.down_proj.weight", tensor)]
        gate, up = tensor.chunk(2, dim=0)
        return [(f"{hf}mlp.experts.{e}.gate_proj.weight", gate), (f"{hf}mlp.experts.{e}.up_proj.weight", up)]
    raise KeyError(f"no Hugging Face name for Megatron parameter {name!r}")


def megatron_to_hf(mg: Mapping[str, torch.Tensor], shape: ModelShape) -> dict[str, torch.Tensor]:
    """A Hugging Face state dict from a full Megatron one (``lm_head.weight`` omitted when embeddings are tied)."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in mg.items():
        if name.endswith("_extra_state"):
            continue
        out.update(megatron_param_to_hf(name, tensor, shape))
    return out


def to_te_names(mg: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Local-spec names → megatron-core's TransformerEngine-spec names (norms fused into the next linear)."""
    out = {}
    for name, tensor in mg.items():
        match = _LAYER.match(name)
        if match is not None and match.group(2) in _TE_NORM_NAMES:
            name = f"decoder.layers.{match.group(1)}.{_TE_NORM_NAMES[match.group(2)]}"
        out[name] = tensor
    return out


# -------------------------------------------------------------------------------------- tensor parallel
def tp_split_dim(name: str) -> int | None:
    """The dimension a Megatron parameter is split along across tensor-parallel ranks (None: replicated)."""
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return 1
    if name.endswith(
        (
            "linear_qkv.weight",
            "linear_qkv.bias",
            "linear_fc1.weight",
            "linear_fc1.bias",
            "word_embeddings.weight",
            "output_layer.weight",
        )
    ):
        return 0
    return None


def _is_glu(name: str) -> bool:
    return name.endswith("linear_fc1.weight")


def split_for_tp(name: str, tensor: torch.Tensor, tp_size: int) -> list[torch.Tensor]:
    """A full Megatron parameter → the shard of every tensor-parallel rank (views where possible)."""
    dim = tp_split_dim(name)
    if tp_size == 1 or dim is None:
        return [tensor] * tp_size
    if tensor.shape[dim] % tp_size:
        raise ValueError(f"{name}: size {tensor.shape[dim]} along dim {dim} does not split over TP={tp_size}")
    if _is_glu(name):
        gate, up = tensor.chunk(2, dim=0)
        return [torch.cat([g, u]) for g, u in zip(gate.chunk(tp_size), up.chunk(tp_size), strict=True)]
    return list(tensor.chunk(tp_size, dim=dim))


def gather_from_tp(name: str, shards: list[torch.Tensor]) -> torch.Tensor:
    """The tensor-parallel shards of a parameter (in rank order) → the full parameter."""
    dim = tp_split_dim(name)
    if len(shards) == 1 or dim is None:
        return shards[0]
    if _is_glu(name):
        pairs = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([p[0] for p in pairs] + [p[1] for p in pairs])
    return torch.cat(shards, dim=dim)


def check_tp_compatible(shape: ModelShape, tp_size: int) -> None:
    """Raise with the flag to change when the model's heads or sizes do not split over ``tp_size`` ranks."""
    problems = []
    if shape.num_key_value_heads % tp_size:
        problems.append(f"num_key_value_heads={shape.num_key_value_heads}")
    if shape.num_attention_heads % tp_size:
        problems.append(f"num_attention_heads={shape.num_attention_heads}")
    if shape.intermediate_size % tp_size:
        problems.append(f"intermediate_size={shape.intermediate_size}")
    if shape.padded_vocab_size % tp_size:
        problems.append(f"padded vocabulary={shape.padded_vocab_size}")
    if problems:
        raise ValueError(
            f"--tensor-model-parallel-size {tp_size} must divide {', '.join(problems)}; choose a divisor"
        )


# --------------------------------------------------------------------------------------- pipeline stages
FIRST_STAGE_FLAG = "--decoder-first-pipeline-num-layers"
LAST_STAGE_FLAG = "--decoder-last-pipeline-num-layers"


def stage_sizes(
    num_layers: int, pp_size: int, *, first: int | None = None, last: int | None = None
) -> list[int]:
    """How many layers each pipeline stage holds, as Megatron splits them: evenly, or ``first`` / ``last`` layers
    on the first / last stage (``--decoder-first-pipeline-num-layers`` / ``--decoder-last-pipeline-num-layers``)
    and the rest evenly over the stages between."""
    if first is None and last is None:
        if num_layers % pp_size:
            raise ValueError(
                f"--pipeline-model-parallel-size {pp_size} must divide the {num_layers} layers of the model "
                f"(or set {FIRST_STAGE_FLAG} / {LAST_STAGE_FLAG})"
            )
        return [num_layers // pp_size] * pp_size
    given = [(flag, n) for flag, n in ((FIRST_STAGE_FLAG, first), (LAST_STAGE_FLAG, last)) if n is not None]
    if pp_size == 1:
        raise ValueError(f"{given[0][0]} needs --pipeline-model-parallel-size above 1")
    for flag, n in given:
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n < num_layers:
            raise ValueError(f"{flag} {n!r} must be a whole number of layers from 1 to {num_layers - 1}")
    middle_stages = pp_size - len(given)
    middle_layers = num_layers - sum(n for _, n in given)
    named = " and ".join(f"{flag} {n}" for flag, n in given)
    if middle_stages == 0 and middle_layers != 0:
        raise ValueError(
            f"{named} must add up to the model's {num_layers} layers with --pipeline-model-parallel-size {pp_size}"
        )
    if middle_stages and (middle_layers < middle_stages or middle_layers % middle_stages):
        raise ValueError(
            f"with {named}, the other {middle_layers} of the model's {num_layers} layers must split evenly over "
            f"the {middle_stages} stages between (--pipeline-model-parallel-size {pp_size})"
        )
    sizes = [middle_layers // middle_stages if middle_stages else 0] * pp_size
    if first is not None:
        sizes[0] = first
    if last is not None:
        sizes[-1] = last
    return sizes


def stage_layers(
    num_layers: int, pp_size: int, pp_rank: int, *, first: int | None = None, last: int | None = None
) -> range:
    """The global layer indices of pipeline stage ``pp_rank`` (split as :func:`stage_sizes` says)."""
    sizes = stage_sizes(num_layers, pp_size, first=first, last=last)
    start = sum(sizes[:pp_rank])
    return range(start, start + sizes[pp_rank])


def stage_state(
    mg: Mapping[str, torch.Tensor], shape: ModelShape, pp_size: int, pp_rank: int
) -> dict[str, torch.Tensor]:
    """The parameters of one pipeline stage, its layers renumbered from 0 (Megatron's per-stage numbering);
    the first stage holds the embedding, the last the final norm and output layer (and, tied, the embedding)."""
    layers = stage_layers(shape.num_layers, pp_size, pp_rank)
    first, last = pp_rank == 0, pp_rank == pp_size - 1
    out = {}
    for name, tensor in mg.items():
        match = _LAYER.match(name)
        if match is not None:
            index = int(match.group(1))
            if index in layers:
                out[f"decoder.layers.{index - layers.start}.{match.group(2)}"] = tensor
        elif name == "embedding.word_embeddings.weight":
            if first:
                out[name] = tensor
            if last and shape.tie_word_embeddings and not first:
                out["output_layer.weight"] = tensor
        elif (name == "decoder.final_layernorm.weight" or name == "output_layer.weight") and last:
            out[name] = tensor
    return out


def iter_hf_layers(hf: Mapping[str, torch.Tensor]) -> Iterator[int]:
    """The layer indices present in a Hugging Face state dict, in order."""
    return iter(sorted({int(m.group(1)) for name in hf if (m := _HF_LAYER.match(name))}))
