"""build_tiny_model writes a directory every Hugging Face loader accepts, deterministically, with Qwen's tokens."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from services.core.tiny_model import SPECIAL_TOKENS, build_tiny_model


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "qwen2")


def test_directory_loads_offline_with_qwen_special_tokens_and_chat_template(qwen2_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= {
        p.name for p in qwen2_dir.iterdir()
    }
    assert sum(p.stat().st_size for p in qwen2_dir.iterdir()) < 5 << 20
    tokenizer = AutoTokenizer.from_pretrained(qwen2_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(qwen2_dir, local_files_only=True)
    assert model.config.vocab_size == len(tokenizer)
    ids = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    assert all(isinstance(i, int) and i < len(tokenizer) for i in ids)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 3?"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n")
    # The BPE round-trips text and splits digits one by one, as Qwen's does.
    text = "What is 12 + 35? The answer is 47."
    encoded = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(encoded) == text
    assert tokenizer.convert_ids_to_tokens(tokenizer("12", add_special_tokens=False)["input_ids"]) == [
        "1",
        "2",
    ]
    with torch.no_grad():
        logits = model(torch.tensor([encoded])).logits
    assert logits.shape == (1, len(encoded), len(tokenizer)) and torch.isfinite(logits).all()
    assert model.generation_config.eos_token_id == [
        tokenizer.convert_tokens_to_ids("<|im_end|>"),
        tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    ]


def test_same_seed_gives_identical_files_and_another_seed_other_weights(
    qwen2_dir: Path, tmp_path: Path
) -> None:
    again = build_tiny_model(tmp_path / "again")
    other = build_tiny_model(tmp_path / "other", seed=1)
    assert _digest(again / "model.safetensors") == _digest(qwen2_dir / "model.safetensors")
    assert _digest(again / "tokenizer.json") == _digest(qwen2_dir / "tokenizer.json")
    assert _digest(other / "model.safetensors") != _digest(qwen2_dir / "model.safetensors")


@pytest.mark.parametrize(("arch", "cls"), [("qwen3", "Qwen3ForCausalLM"), ("llama", "LlamaForCausalLM")])
def test_other_architectures_and_shapes(tmp_path: Path, arch: str, cls: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = build_tiny_model(
        tmp_path / arch, arch=arch, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1
    )
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == cls
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 1
    assert AutoTokenizer.from_pretrained(out).decode([0]) == "<|endoftext|>"


def test_bad_shapes_are_rejected_with_the_argument_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="num_heads"):
        build_tiny_model(tmp_path / "bad", hidden_size=60, num_heads=8)
    with pytest.raises(ValueError, match="arch"):
        build_tiny_model(tmp_path / "bad", arch="gpt2")
