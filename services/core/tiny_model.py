"""Build a tiny, randomly initialised Hugging Face causal LM with a real byte-level BPE tokenizer.

Tests, the quick start and CPU benchmarks need a model directory that every Hugging Face loader accepts
(config, safetensors, generation config, tokenizer with Qwen's special tokens and chat template) yet is a few MB.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterable
from pathlib import Path

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

# Qwen2's pre-tokenisation: digits split one by one, words with their leading space, punctuation runs.
_QWEN_SPLIT_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

# The chat template of Qwen2.5-Instruct, reduced to what a tokenizer without tools needs.
QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if loop.first and message['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_ARCHS = {
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
}

_ENGLISH = (
    "The quick brown fox jumps over the lazy dog. A model learns to add numbers step by step. "
    "Please answer the question and put the final answer in a box. The answer is correct. "
    "We think about the problem first, then we write the solution. Let me check the result again. "
    "Reinforcement learning improves the policy with rewards from a verifier. "
    "Question: what is the sum? Answer: the sum is shown below. Therefore the final answer is "
)


def default_corpus(seed: int = 0, lines: int = 2000) -> list[str]:
    """A deterministic text of arithmetic questions, answers and plain English, enough to train a small BPE."""
    rng = random.Random(seed)
    out = [_ENGLISH]
    ops = [("+", lambda a, b: a + b), ("-", lambda a, b: a - b), ("*", lambda a, b: a * b)]
    for _ in range(lines):
        a, b = rng.randint(0, 999), rng.randint(0, 99)
        sym, fn = rng.choice(ops)
        out.append(f"What is {a} {sym} {b}? The answer is {fn(a, b)}. \\boxed{{{fn(a, b)}}}\n")
    return out


def train_tokenizer(corpus: Iterable[str], vocab_size: int):
    """Train a Qwen-style byte-level BPE with the Qwen special tokens on ``corpus``."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=None, byte_fallback=False, fuse_unk=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(corpus), trainer=trainer)
    return tokenizer


def build_tiny_model(
    out_dir: str | Path,
    *,
    arch: str = "qwen2",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 512,
    seed: int = 0,
    corpus: Iterable[str] | None = None,
    vocab_size: int | None = None,
    dtype: str = "float32",
    num_experts: int = 4,
    num_experts_per_tok: int = 2,
) -> Path:
    """Write a Hugging Face model directory (config, safetensors, generation config, tokenizer) to ``out_dir``.

    ``vocab_size`` is the BPE target (default 512); the model's vocabulary is exactly the trained tokenizer's.
    The same arguments always give byte-identical weights and tokenizer. ``qwen3_moe`` gives every layer
    ``num_experts`` experts of width ``intermediate_size`` with ``num_experts_per_tok`` routed per token.
    """
    if arch not in _ARCHS:
        raise ValueError(f"arch must be one of {sorted(_ARCHS)}, got {arch!r}")
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError(
            f"hidden_size ({hidden_size}) must divide by num_heads ({num_heads}), "
            f"and num_heads by num_kv_heads ({num_kv_heads})"
        )
    import torch
    import transformers
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = list(corpus) if corpus is not None else default_corpus(seed)
    raw = train_tokenizer(text, vocab_size or 512)
    ids = {tok: raw.token_to_id(tok) for tok in SPECIAL_TOKENS}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        model_max_length=max_position_embeddings,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    tokenizer.save_pretrained(out)
    _make_tokenizer_config_portable(out / "tokenizer_config.json")

    config_cls_name, _ = _ARCHS[arch]
    config_cls = getattr(transformers, config_cls_name)
    config_kwargs = dict(
        vocab_size=raw.get_vocab_size(),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        rms_norm_eps=1e-6,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    if arch in ("qwen3", "qwen3_moe"):
        config_kwargs["head_dim"] = hidden_size // num_heads
    if arch == "qwen3_moe":
        config_kwargs.update(
            num_experts=num_experts,
            num_experts_per_tok=num_experts_per_tok,
            moe_intermediate_size=intermediate_size,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        )
    config = config_cls(**config_kwargs)
    torch_dtype = getattr(torch, dtype)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        # Hugging Face starts biases and norms at constants; random values make a load that drops or swaps
        # one of them visible in the outputs.
        gen = torch.Generator().manual_seed(seed)
        for name, param in sorted(model.named_parameters()):
            if name.endswith(".bias") or "norm" in name:
                param.copy_(param + 0.1 * torch.randn(param.shape, generator=gen))
    model = model.to(torch_dtype)
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
    )
    model.save_pretrained(out, safe_serialization=True)
    logger.info(
        "wrote tiny %s model (%d parameters) to %s", arch, sum(p.numel() for p in model.parameters()), out
    )
    return out


def _make_tokenizer_config_portable(path: Path) -> None:
    """Name the generic fast-tokenizer class and inline the chat template so transformers 4.x and 5.x both load it.

    Without an explicit class, a Llama config would make ``AutoTokenizer`` pick Llama's tokenizer, whose
    pre-tokenizer differs from the one trained here.
    """
    config = json.loads(path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["additional_special_tokens"] = ["<|im_start|>"]
    config["chat_template"] = QWEN_CHAT_TEMPLATE
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
