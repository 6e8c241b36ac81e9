"""The Megatron model architecture from a Hugging Face config, and the check that Megatron's flags agree with it.

``--use-hf-config-for-megatron`` takes every architecture flag from the Hugging Face config; without it the flags
(``--num-layers``, ``--hidden-size``, …) must describe the same model, and ``check_megatron_args`` says which one
differs, as slime's ``hf_validate_args`` does. Pure Python: no megatron-core needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from trainer.backends.megatron_backend.convert import ModelShape, padded_vocab_size


@dataclass(frozen=True)
class Architecture:
    """What ``TransformerConfig`` and ``GPTModel`` are built from."""

    shape: ModelShape
    norm_epsilon: float
    rotary_base: float
    max_position_embeddings: int
    rope_scaling_factor: float | None
    moe_router_topk: int = 0
    moe_norm_topk_prob: bool = False

    def transformer_config_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of megatron-core's ``TransformerConfig`` for this model (no parallelism, no dtype)."""
        s = self.shape
        kwargs: dict[str, Any] = {
            "num_layers": s.num_layers,
            "hidden_size": s.hidden_size,
            "ffn_hidden_size": s.intermediate_size,
            "num_attention_heads": s.num_attention_heads,
            "num_query_groups": s.num_key_value_heads,
            "kv_channels": s.head_dim,
            "normalization": "RMSNorm",
            "layernorm_epsilon": self.norm_epsilon,
            "gated_linear_unit": True,
            "add_bias_linear": False,
            "add_qkv_bias": s.qkv_bias,
            "qk_layernorm": s.qk_norm,
            "hidden_dropout": 0.0,
            "attention_dropout": 0.0,
            "bias_dropout_fusion": False,
            "apply_rope_fusion": False,
            "masked_softmax_fusion": False,
            "persist_layer_norm": False,
            "gradient_accumulation_fusion": False,
        }
        if s.num_experts:
            kwargs.update(
                num_moe_experts=s.num_experts,
                moe_ffn_hidden_size=s.moe_intermediate_size,
                moe_router_topk=self.moe_router_topk,
                moe_router_pre_softmax=not self.moe_norm_topk_prob,
                moe_router_load_balancing_type="none",
                moe_aux_loss_coeff=0.0,
                moe_token_dispatcher_type="alltoall",
                moe_grouped_gemm=False,
            )
        return kwargs


def architecture_from_hf(
    hf_config: Any, *, padded_vocab: int | None, make_vocab_size_divisible_by: int, tp_size: int
) -> Architecture:
    shape = ModelShape.from_hf_config(
        hf_config,
        padded_vocab=padded_vocab,
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        tp_size=tp_size,
    )
    get = hf_config.get if isinstance(hf_config, dict) else (lambda k, d=None: getattr(hf_config, k, d))
    rope_scaling = get("rope_scaling") or {}
    rope_type = rope_scaling.get("rope_type", rope_scaling.get("type")) if rope_scaling else None
    factor = None
    if rope_type not in (None, "default"):
        if rope_type != "llama3":
            raise ValueError(
                f"rope_scaling {rope_type!r} of the Hugging Face config has no Megatron equivalent here; "
                "supported: none, llama3"
            )
        factor = float(rope_scaling.get("factor", 8.0))
    theta = get("rope_theta")
    if theta is None:
        # transformers 5 keeps rope_theta inside rope_parameters.
        theta = (get("rope_parameters") or {}).get("rope_theta", 10000.0)
    return Architecture(
        shape=shape,
        norm_epsilon=float(get("rms_norm_eps", 1e-6)),
        rotary_base=float(theta),
        max_position_embeddings=int(get("max_position_embeddings")),
        rope_scaling_factor=factor,
        moe_router_topk=int(get("num_experts_per_tok") or 0),
        moe_norm_topk_prob=bool(get("norm_topk_prob", False)),
    )


def check_megatron_args(args: Any, arch: Architecture) -> None:
    """Raise naming every Megatron flag that contradicts the Hugging Face config (flags left unset are fine),
    unless ``--use-hf-config-for-megatron`` said to take the architecture from it."""
    if getattr(args, "use_hf_config_for_megatron", False):
        return
    s = arch.shape
    expected = {
        "num_layers": ("--num-layers", s.num_layers),
        "hidden_size": ("--hidden-size", s.hidden_size),
        "ffn_hidden_size": ("--ffn-hidden-size", s.intermediate_size),
        "num_attention_heads": ("--num-attention-heads", s.num_attention_heads),
        "kv_channels": ("--kv-channels", s.head_dim),
        "max_position_embeddings": ("--max-position-embeddings", None),
    }
    problems = []
    for dest, (flag, value) in expected.items():
        given = getattr(args, dest, None)
        if given is not None and value is not None and given != value:
            problems.append(f"{flag} {given} (the Hugging Face config has {value})")
    if getattr(args, "group_query_attention", False) and args.num_query_groups != s.num_key_value_heads:
        problems.append(
            f"--num-query-groups {args.num_query_groups} (num_key_value_heads is {s.num_key_value_heads})"
        )
    if getattr(args, "num_layers", None) is not None:
        # Flags of a full architecture description: check the switches too.
        if args.normalization != "RMSNorm":
            problems.append(f"--normalization {args.normalization} (the model uses RMSNorm)")
        if not args.swiglu:
            problems.append("--swiglu is missing (the model's MLP is SwiGLU)")
        if args.untie_embeddings_and_output_weights == s.tie_word_embeddings:
            tied = "tied" if s.tie_word_embeddings else "untied"
            problems.append(
                f"--untie-embeddings-and-output-weights disagrees (the model's embeddings are {tied})"
            )
        if args.qk_layernorm != s.qk_norm:
            problems.append(
                f"--qk-layernorm {'given' if args.qk_layernorm else 'missing'} (model: {s.qk_norm})"
            )
        if args.add_qkv_bias != s.qkv_bias and not (args.add_bias_linear and s.qkv_bias):
            problems.append(
                f"--add-qkv-bias {'given' if args.add_qkv_bias else 'missing'} (model: {s.qkv_bias})"
            )
        if args.rotary_base != int(arch.rotary_base):
            problems.append(f"--rotary-base {args.rotary_base} (rope_theta is {arch.rotary_base:g})")
        if abs(args.norm_epsilon - arch.norm_epsilon) > 1e-12:
            problems.append(f"--norm-epsilon {args.norm_epsilon} (rms_norm_eps is {arch.norm_epsilon})")
    if getattr(args, "vocab_size", None) is not None and args.vocab_size != s.vocab_size:
        problems.append(f"--vocab-size {args.vocab_size} (the Hugging Face config has {s.vocab_size})")
    if problems:
        raise ValueError(
            "Megatron arguments disagree with the Hugging Face config of --hf-checkpoint: "
            + "; ".join(problems)
            + ". Fix them, or pass --use-hf-config-for-megatron to take the architecture from the config."
        )


def pipeline_split_flags(args: Any) -> tuple[int | None, int | None]:
    """``--decoder-first-pipeline-num-layers`` and ``--decoder-last-pipeline-num-layers`` (Megatron pass-through
    flags; None when not given)."""
    return (
        getattr(args, "decoder_first_pipeline_num_layers", None),
        getattr(args, "decoder_last_pipeline_num_layers", None),
    )


def recompute_config_kwargs(args: Any, layers_per_stage: int | None = None) -> dict[str, Any]:
    """megatron-core ``TransformerConfig``'s activation-recomputation fields from slime's (Megatron's) flags.

    - ``--recompute-granularity selective`` (or ``--recompute-activations``, Megatron's shorthand for it): every
      layer's core attention is recomputed in the backward pass; it takes no ``--recompute-method`` or
      ``--recompute-num-layers``.
    - ``--recompute-granularity full``: whole layers keep only their input and are recomputed, chosen by
      ``--recompute-method uniform`` (every layer, checkpointed in chunks of ``--recompute-num-layers``) or ``block``
      (the first ``--recompute-num-layers`` layers of each pipeline stage).

    Combinations megatron-core (or Megatron-LM's argument check) would reject raise here naming the flag;
    ``layers_per_stage``, when known, bounds ``--recompute-num-layers``."""
    granularity = args.recompute_granularity
    method, num_layers = args.recompute_method, args.recompute_num_layers
    modules = getattr(args, "recompute_modules", None)
    if getattr(args, "recompute_activations", False):
        if granularity == "full":
            raise ValueError(
                "--recompute-activations is Megatron's shorthand for --recompute-granularity selective, but "
                "--recompute-granularity full is given: pass one of them"
            )
        granularity = "selective"
    if granularity is None:
        stray = [
            flag
            for flag, value in (
                ("--recompute-method", method),
                ("--recompute-num-layers", num_layers),
                ("--recompute-modules", modules),
            )
            if value is not None
        ]
        if stray:
            raise ValueError(
                f"{' and '.join(stray)} given without --recompute-granularity: pass --recompute-granularity full "
                "(with --recompute-method and --recompute-num-layers) or selective (with --recompute-modules)"
            )
        return {}
    if granularity == "selective":
        if method is not None or num_layers is not None:
            flag = "--recompute-method" if method is not None else "--recompute-num-layers"
            raise ValueError(
                f"{flag} applies to --recompute-granularity full; selective recomputation recomputes the core "
                "attention of every layer and takes neither --recompute-method nor --recompute-num-layers"
            )
        if modules is not None and modules not in ("core_attn", ["core_attn"]):
            given = " ".join(map(str, modules)) if isinstance(modules, list) else modules
            raise ValueError(
                f"--recompute-modules {given}: this backend's selective recomputation recomputes core attention "
                "only (--recompute-modules core_attn, the default)"
            )
        return {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]}
    if modules is not None:
        raise ValueError("--recompute-modules applies to --recompute-granularity selective, not full")
    if method is None:
        raise ValueError(
            "--recompute-granularity full needs --recompute-method: uniform (every layer recomputed, checkpointed "
            "in chunks of --recompute-num-layers) or block (the first --recompute-num-layers layers of each "
            "pipeline stage)"
        )
    if (
        num_layers is None
        or num_layers < 1
        or (layers_per_stage is not None and num_layers > layers_per_stage)
    ):
        bound = "the layers of a pipeline stage"
        if layers_per_stage is not None:
            bound = f"{layers_per_stage} ({bound})"
        given = "is missing" if num_layers is None else f"is {num_layers}"
        raise ValueError(
            f"--recompute-granularity full needs --recompute-num-layers between 1 and {bound}; it {given}"
        )
    return {"recompute_granularity": "full", "recompute_method": method, "recompute_num_layers": num_layers}


__all__ = [
    "Architecture",
    "architecture_from_hf",
    "check_megatron_args",
    "padded_vocab_size",
    "pipeline_split_flags",
    "recompute_config_kwargs",
]
