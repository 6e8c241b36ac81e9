"""The built-in engine's transformer: Llama-family decoders (Llama, Qwen2, Qwen3) with fused projections.

The forward pass works on a flat list of tokens from many sequences at once: decode tokens of the running batch
(one per KV-cache slot, attended against the slot cache) and prefill chunks (whole prompts written into their
slot, or chunks of long prompts into a per-sequence staging cache). Parameters keep Hugging Face's numerics
(RMSNorm in fp32, rotate-half RoPE, SiLU-gated MLP) so that log-probs match a Hugging Face forward of the same
checkpoint.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}


@dataclass(frozen=True)
class ModelConfig:
    """The subset of a Hugging Face ``config.json`` the engine needs, checked on load."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict = field(default_factory=dict)
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    torch_dtype: str = "float32"
    eos_token_ids: tuple[int, ...] = ()

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: --hf-checkpoint must be a Hugging Face model directory"
            )
        raw = json.loads(path.read_text())
        archs = raw.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ValueError(
                f"{path}: architectures {archs} not supported by the built-in engine; "
                f"supported: {sorted(SUPPORTED_ARCHITECTURES)} (use --engine-backend sglang for others)"
            )
        family = SUPPORTED_ARCHITECTURES[arch]
        if raw.get("use_sliding_window"):
            raise ValueError(f"{path}: sliding-window attention is not supported by the built-in engine")
        num_heads = int(raw["num_attention_heads"])
        hidden = int(raw["hidden_size"])
        # transformers 5 keeps theta and scaling in rope_parameters; 4.x in rope_theta / rope_scaling.
        rope = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
        theta = float(rope.pop("rope_theta", raw.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "linear", "llama3"):
            raise ValueError(f"{path}: rope type {rope_type!r} not supported (default, linear, llama3)")
        rope["rope_type"] = rope_type
        eos = raw.get("eos_token_id")
        gen_path = Path(model_dir) / "generation_config.json"
        if gen_path.is_file():
            gen_eos = json.loads(gen_path.read_text()).get("eos_token_id")
            eos = gen_eos if gen_eos is not None else eos
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        return cls(
            architecture=arch,
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]),
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or num_heads),
            head_dim=int(raw.get("head_dim") or hidden // num_heads),
            max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=rope,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=family == "qwen2" or bool(raw.get("attention_bias", False)),
            qk_norm=family == "qwen3",
            torch_dtype=str(raw.get("dtype") or raw.get("torch_dtype") or "float32"),
            eos_token_ids=eos_ids,
        )

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse RoPE frequencies as Hugging Face computes them for the default, linear and llama3 types."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = cfg.rope_scaling
    if scaling["rope_type"] == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif scaling["rope_type"] == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


@dataclass
class LayerWeights:
    """One decoder layer, with q/k/v and gate/up fused so each is one matmul."""

    input_norm: torch.Tensor
    qkv_weight: torch.Tensor
    qkv_bias: torch.Tensor | None
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    o_weight: torch.Tensor
    post_norm: torch.Tensor
    gate_up_weight: torch.Tensor
    down_weight: torch.Tensor


@dataclass(frozen=True)
class ParamTarget:
    """Where a Hugging Face tensor lands: rows ``[row_start, row_start + shape[0])`` of ``tensor`` (or all of it)."""

    tensor: torch.Tensor
    shape: tuple[int, ...]
    row_start: int | None = None

    def view(self) -> torch.Tensor:
        if self.row_start is None:
            return self.tensor
        return self.tensor[self.row_start : self.row_start + self.shape[0]]


@dataclass
class PrefillSegment:
    """One chunk of one sequence's prompt: tokens ``[start, start + length)`` of it. A prompt prefilled whole in
    one iteration writes straight into the KV-cache ``slot`` it will decode from; a chunked one goes through its
    ``stage`` buffer."""

    token_offset: int
    length: int
    start: int
    stage: StageCache | None = None
    slot: int | None = None


class StageCache:
    """Keys and values of one sequence while its prompt is being prefilled, chunk by chunk."""

    def __init__(self, cfg: ModelConfig, capacity: int, dtype: torch.dtype, device: torch.device):
        shape = (cfg.num_layers, cfg.num_kv_heads, capacity, cfg.head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)


@dataclass
class ForwardBatch:
    """What one forward pass computes: ``num_decode`` decode tokens first (row i = cache slot i), then prefill
    chunks. ``positions`` holds every token's position; ``decode_mask [num_decode, decode_len]`` the additive
    attention mask of the decode rows over the cached positions."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    num_decode: int = 0
    decode_len: int = 0
    decode_mask: torch.Tensor | None = None
    segments: list[PrefillSegment] = field(default_factory=list)
    # (source slot, destination slot, tokens): keys/values to copy once the forward has written the source.
    slot_copies: list[tuple[int, int, int]] = field(default_factory=list)


class KVCache:
    """Per-layer key/value tensors of shape ``[slots, kv_heads, context_len, head_dim]``; slot i holds row i of the
    running batch, so decode attention reads a contiguous ``[:batch]`` view without gathering."""

    def __init__(
        self, cfg: ModelConfig, slots: int, context_len: int, dtype: torch.dtype, device: torch.device
    ):
        self.slots = slots
        self.context_len = context_len
        shape = (cfg.num_layers, slots, cfg.num_kv_heads, context_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        # What may have been written since the last reset: slots [:used_slots], positions [:used_len].
        self.used_slots = 0
        self.used_len = 0

    def touch(self, slots: int, length: int) -> None:
        """Note that writes may reach slots below ``slots`` at positions below ``length``."""
        self.used_slots = max(self.used_slots, min(slots, self.slots))
        self.used_len = max(self.used_len, min(length, self.context_len))

    def reset(self) -> None:
        """Zero what was written since the last reset (the whole cache is zeroed at creation): a masked position
        then never holds a stale value, such as an inf or NaN of weights since replaced."""
        if self.used_slots and self.used_len:
            self.k[:, : self.used_slots, :, : self.used_len].zero_()
            self.v[:, : self.used_slots, :, : self.used_len].zero_()
        self.used_slots = self.used_len = 0

    @staticmethod
    def bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
        return 2 * cfg.num_layers * cfg.kv_size * torch.empty((), dtype=dtype).element_size()

    def move_slot(self, src: int, dst: int, length: int) -> None:
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]

    def move_slots(self, src: list[int], dst: list[int], length: int) -> None:
        """Copy slots ``src`` into slots ``dst`` (two disjoint sets), the first ``length`` positions of each."""
        if len(src) == 1:
            self.move_slot(src[0], dst[0], length)
            return
        src_index = torch.tensor(src, device=self.k.device)
        dst_index = torch.tensor(dst, device=self.k.device)
        for cache in (self.k, self.v):
            cache[:, dst_index, :, :length] = cache[:, src_index, :, :length]

    def store_stage(self, slot: int, stage: StageCache, length: int) -> None:
        self.k[:, slot, :, :length] = stage.k[:, :, :length]
        self.v[:, slot, :, :length] = stage.v[:, :, :length]


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # torch's rms_norm computes in fp32 and multiplies by the weight after casting back, as Hugging Face does.
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def _direct_groups(segments: list[PrefillSegment]) -> list[list[PrefillSegment]]:
    """Split whole-prompt segments into runs that are adjacent in the token list and in the KV slots and share
    a length, so each run is one batched attention call."""
    groups: list[list[PrefillSegment]] = []
    for seg in segments:
        last = groups[-1][-1] if groups else None
        if (
            last is not None
            and seg.length == last.length
            and seg.slot == last.slot + 1
            and seg.token_offset == last.token_offset + last.length
        ):
            groups[-1].append(seg)
        else:
            groups.append([seg])
    return groups


def _rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """Hugging Face's ``x * cos + rotate_half(x) * sin`` in three kernels: ``rotate_half(x)`` is ``x`` rolled by
    half a head with the first half negated, and that sign is folded into ``sin_signed``."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin_signed)


class CausalLM:
    """Weights plus the forward pass; one instance is owned by the engine's scheduler thread."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device, max_positions: int):
        self.cfg = cfg
        self.dtype = dtype
        self.device = device

        def empty(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)

        h, qkv = cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size
        self.embed = empty(cfg.vocab_size, h)
        self.layers = [
            LayerWeights(
                input_norm=empty(h),
                qkv_weight=empty(qkv, h),
                qkv_bias=empty(qkv) if cfg.qkv_bias else None,
                q_norm=empty(cfg.head_dim) if cfg.qk_norm else None,
                k_norm=empty(cfg.head_dim) if cfg.qk_norm else None,
                o_weight=empty(h, cfg.q_size),
                post_norm=empty(h),
                gate_up_weight=empty(2 * cfg.intermediate_size, h),
                down_weight=empty(h, cfg.intermediate_size),
            )
            for _ in range(cfg.num_layers)
        ]
        self.norm = empty(h)
        self.lm_head = self.embed if cfg.tie_word_embeddings else empty(cfg.vocab_size, h)
        positions = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(positions, rope_inv_freq(cfg))
        emb = torch.cat((freqs, freqs), dim=-1)
        half = cfg.head_dim // 2
        sign = torch.cat((-torch.ones(half), torch.ones(half)))
        self.cos = emb.cos().to(dtype=dtype, device=device)
        self.sin_signed = (emb.sin().to(dtype) * sign.to(dtype)).to(device)
        self.scale = cfg.head_dim**-0.5
        # Half-precision scores would round attention logits to ~3 digits: compute them in fp32 (cuBLAS can
        # write fp32 from bf16 inputs directly; elsewhere the inputs are converted first).
        self._fp32_scores_from_half = device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)

    # ---------------------------------------------------------------- weights

    def param_targets(self) -> dict[str, ParamTarget]:
        """Every Hugging Face parameter name this model loads, with the tensor (slice) it lands in."""
        cfg = self.cfg
        targets = {"model.embed_tokens.weight": ParamTarget(self.embed, tuple(self.embed.shape))}
        targets["model.norm.weight"] = ParamTarget(self.norm, tuple(self.norm.shape))
        if not cfg.tie_word_embeddings:
            targets["lm_head.weight"] = ParamTarget(self.lm_head, tuple(self.lm_head.shape))
        h, inter = cfg.hidden_size, cfg.intermediate_size
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            targets[p + "input_layernorm.weight"] = ParamTarget(layer.input_norm, (h,))
            targets[p + "post_attention_layernorm.weight"] = ParamTarget(layer.post_norm, (h,))
            offsets = {"q": 0, "k": cfg.q_size, "v": cfg.q_size + cfg.kv_size}
            sizes = {"q": cfg.q_size, "k": cfg.kv_size, "v": cfg.kv_size}
            for proj in "qkv":
                targets[p + f"self_attn.{proj}_proj.weight"] = ParamTarget(
                    layer.qkv_weight, (sizes[proj], h), offsets[proj]
                )
                if layer.qkv_bias is not None:
                    targets[p + f"self_attn.{proj}_proj.bias"] = ParamTarget(
                        layer.qkv_bias, (sizes[proj],), offsets[proj]
                    )
            if layer.q_norm is not None:
                targets[p + "self_attn.q_norm.weight"] = ParamTarget(layer.q_norm, (cfg.head_dim,))
                targets[p + "self_attn.k_norm.weight"] = ParamTarget(layer.k_norm, (cfg.head_dim,))
            targets[p + "self_attn.o_proj.weight"] = ParamTarget(layer.o_weight, (h, cfg.q_size))
            targets[p + "mlp.gate_proj.weight"] = ParamTarget(layer.gate_up_weight, (inter, h), 0)
            targets[p + "mlp.up_proj.weight"] = ParamTarget(layer.gate_up_weight, (inter, h), inter)
            targets[p + "mlp.down_proj.weight"] = ParamTarget(layer.down_weight, (h, inter))
        return targets

    def tensors(self) -> list[torch.Tensor]:
        """Every distinct storage-owning tensor, for moving the weights off and back onto the device."""
        out = [self.embed, self.norm]
        if not self.cfg.tie_word_embeddings:
            out.append(self.lm_head)
        for layer in self.layers:
            out.extend(t for t in vars(layer).values() if t is not None)
        return out

    # ---------------------------------------------------------------- forward

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, kv: KVCache, logit_rows: torch.Tensor) -> torch.Tensor:
        """Run ``batch`` through the model, writing keys/values, and return fp32 logits of ``logit_rows``.

        Kernel count matters on GPUs (a small model's decode step is launch-bound): q/k/v and gate/up are
        single matmuls, RoPE is three kernels for q and k together, residual adds ride on ``addmm``.
        """
        cfg = self.cfg
        n_tok = batch.input_ids.shape[0]
        heads, kv_heads, dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        cos = self.cos[batch.positions].unsqueeze(1)
        sin = self.sin_signed[batch.positions].unsqueeze(1)
        x = self.embed[batch.input_ids]
        nd = batch.num_decode
        if nd:
            decode_slots = torch.arange(nd, device=self.device)
            decode_pos = batch.positions[:nd]
            length = batch.decode_len
            # One additive mask row per (sequence, KV head), broadcast over the query heads of the group.
            mask = (
                batch.decode_mask.unsqueeze(1).expand(nd, kv_heads, length).reshape(nd * kv_heads, 1, length)
            )
        staged = [seg for seg in batch.segments if seg.slot is None]
        groups = _direct_groups([seg for seg in batch.segments if seg.slot is not None])
        h = _rms_norm(x, self.layers[0].input_norm, cfg.rms_norm_eps) if self.layers else x
        for li, layer in enumerate(self.layers):
            qkv = F.linear(h, layer.qkv_weight, layer.qkv_bias)
            v = qkv[:, cfg.q_size + cfg.kv_size :].view(n_tok, kv_heads, dim)
            if layer.q_norm is None:
                qk = _rope(qkv[:, : cfg.q_size + cfg.kv_size].view(n_tok, heads + kv_heads, dim), cos, sin)
                q, k = qk[:, :heads], qk[:, heads:]
            else:
                q = _rope(
                    _rms_norm(qkv[:, : cfg.q_size].view(n_tok, heads, dim), layer.q_norm, cfg.rms_norm_eps),
                    cos,
                    sin,
                )
                k_raw = qkv[:, cfg.q_size : cfg.q_size + cfg.kv_size].view(n_tok, kv_heads, dim)
                k = _rope(_rms_norm(k_raw, layer.k_norm, cfg.rms_norm_eps), cos, sin)
            attn = torch.empty(n_tok, heads, dim, dtype=x.dtype, device=self.device)
            if nd:
                kv.k[li][decode_slots, :, decode_pos] = k[:nd]
                kv.v[li][decode_slots, :, decode_pos] = v[:nd]
                self._decode_attention(
                    q[:nd], kv.k[li, :nd, :, :length], kv.v[li, :nd, :, :length], mask, attn[:nd]
                )
            for group in groups:
                self._prefill_group(group, q, k, v, kv, li, attn)
            for seg in staged:
                lo, hi = seg.token_offset, seg.token_offset + seg.length
                end = seg.start + seg.length
                seg.stage.k[li, :, seg.start : end] = k[lo:hi].transpose(0, 1)
                seg.stage.v[li, :, seg.start : end] = v[lo:hi].transpose(0, 1)
                attn[lo:hi] = self._prefill_attention(
                    q[lo:hi], seg.stage.k[li, :, :end], seg.stage.v[li, :, :end], seg.start
                )
            x = torch.addmm(x, attn.view(n_tok, cfg.q_size), layer.o_weight.t())
            h = _rms_norm(x, layer.post_norm, cfg.rms_norm_eps)
            gate_up = F.linear(h, layer.gate_up_weight)
            inter = cfg.intermediate_size
            x = torch.addmm(x, F.silu(gate_up[:, :inter]) * gate_up[:, inter:], layer.down_weight.t())
            if li + 1 < len(self.layers):
                h = _rms_norm(x, self.layers[li + 1].input_norm, cfg.rms_norm_eps)
        x = _rms_norm(x[logit_rows], self.norm, cfg.rms_norm_eps)
        return F.linear(x, self.lm_head).float()

    def _decode_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, out: torch.Tensor
    ) -> None:
        """One query per row against its cached keys, into ``out``: ``q/out [B, H, D]``, ``k/v [B, KV, T, D]``,
        ``mask [B * KV, 1, T]``.

        Query heads of a group share their KV head's keys, so each (row, KV head) is one small matmul of the
        batched product; this beats fused attention kernels for a single query row on CPU, and on GPU runs
        inside the decode CUDA graph.
        """
        b, kvh, length, d = k.shape
        group = q.shape[1] // kvh
        qg = q.reshape(b * kvh, group, d)
        keys = k.reshape(b * kvh, length, d).transpose(1, 2)
        if self._fp32_scores_from_half:
            scores = torch.baddbmm(mask, qg, keys, alpha=self.scale, out_dtype=torch.float32)
        else:
            scores = torch.baddbmm(mask, qg.float(), keys.float(), alpha=self.scale)
        probs = torch.softmax(scores, dim=-1).to(v.dtype)
        torch.bmm(probs, v.reshape(b * kvh, length, d), out=out.view(b * kvh, group, d))

    def _prefill_group(
        self,
        group: list[PrefillSegment],
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv: KVCache,
        li: int,
        attn: torch.Tensor,
    ) -> None:
        """Whole prompts of equal length in consecutive slots: one cache write and one causal attention call for
        all of them (the copies of a prompt in a GRPO group are such a run)."""
        n, c = len(group), group[0].length
        lo, hi = group[0].token_offset, group[-1].token_offset + c
        first = group[0].slot
        shape = (n, c, -1, self.cfg.head_dim)
        kh = k[lo:hi].reshape(shape).transpose(1, 2)
        vh = v[lo:hi].reshape(shape).transpose(1, 2)
        kv.k[li, first : first + n, :, :c] = kh
        kv.v[li, first : first + n, :, :c] = vh
        qh = q[lo:hi].reshape(shape).transpose(1, 2)
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, enable_gqa=True)
        attn[lo:hi] = out.transpose(1, 2).reshape(hi - lo, -1, self.cfg.head_dim)

    def _prefill_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int
    ) -> torch.Tensor:
        """Causal attention of a chunk ``q [C, H, D]`` at positions ``start..`` over keys ``[KV, start + C, D]``."""
        c = q.shape[0]
        qh = q.transpose(0, 1).unsqueeze(0)
        kh, vh = k.unsqueeze(0), v.unsqueeze(0)
        if start == 0:
            out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, enable_gqa=True)
        else:
            q_pos = torch.arange(start, start + c, device=q.device).unsqueeze(1)
            k_pos = torch.arange(start + c, device=q.device).unsqueeze(0)
            out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=k_pos <= q_pos, enable_gqa=True)
        return out.squeeze(0).transpose(0, 1)
