"""Hugging Face ⇄ Megatron weight conversion on CPU: bitwise round trips for Qwen2, Qwen3, Llama and Qwen3-MoE,
tensor-parallel shards that hold whole heads and their own gate/up halves, vocabulary padding, pipeline stages,
the ``slime convert`` commands and the Hugging Face config check."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from services.core.arguments import parse_args
from services.core.tiny_model import build_tiny_model, default_corpus
from trainer import checkpoint
from trainer.backends.megatron_backend import convert, torch_format
from trainer.backends.megatron_backend.config import architecture_from_hf, check_megatron_args

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module", params=["qwen2", "qwen3", "llama"])
def model_dir(request, tmp_path_factory) -> Path:
    return build_tiny_model(
        tmp_path_factory.mktemp(request.param) / "model",
        arch=request.param,
        hidden_size=32,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=64,
        corpus=default_corpus(lines=50),
        vocab_size=300,
    )


def _hf(model_dir: Path) -> tuple[dict[str, torch.Tensor], dict]:
    config = json.loads((model_dir / "config.json").read_text())
    return checkpoint.read_hf_weights(model_dir, flag="--hf-checkpoint"), config


def _assert_bitwise(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def test_round_trip_is_bitwise_and_pads_the_vocabulary(model_dir):
    hf, config = _hf(model_dir)
    shape = convert.ModelShape.from_hf_config(config, make_vocab_size_divisible_by=128, tp_size=2)
    assert shape.padded_vocab_size == 512 and shape.vocab_size == config["vocab_size"] < 512
    mg = convert.hf_to_megatron(hf, shape)
    embedding = mg["embedding.word_embeddings.weight"]
    assert embedding.shape[0] == 512 and not embedding[shape.vocab_size :].any()
    assert "output_layer.weight" not in mg  # tied
    assert ("decoder.layers.0.self_attention.q_layernorm.weight" in mg) == (config["model_type"] == "qwen3")
    assert ("decoder.layers.0.self_attention.linear_qkv.bias" in mg) == (config["model_type"] == "qwen2")
    _assert_bitwise(convert.megatron_to_hf(mg, shape), hf)


@pytest.mark.parametrize("model_dir", ["qwen2"], indirect=True)
def test_explicit_padded_vocab_size_wins_and_must_hold_the_vocabulary(model_dir):
    _, config = _hf(model_dir)
    assert convert.ModelShape.from_hf_config(config, padded_vocab=1000).padded_vocab_size == 1000
    with pytest.raises(ValueError, match="--padded-vocab-size 10"):
        convert.ModelShape.from_hf_config(config, padded_vocab=10)


def test_untied_output_layer_round_trips():
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=200,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        intermediate_size=48,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    hf = dict(AutoModelForCausalLM.from_config(config).state_dict())
    shape = convert.ModelShape.from_hf_config(config.to_dict())
    assert not shape.qkv_bias and not shape.tie_word_embeddings and shape.heads_per_group == 4
    mg = convert.hf_to_megatron(hf, shape)
    assert mg["output_layer.weight"].shape == (256, 32)
    _assert_bitwise(convert.megatron_to_hf(mg, shape), hf)
    with pytest.raises(ValueError, match="attention_bias"):
        convert.ModelShape.from_hf_config({**config.to_dict(), "attention_bias": True})


def test_critic_value_head_round_trip(model_dir, tmp_path):
    """A token-classification critic (``score``, no ``lm_head``): the head is replicated over TP and comes back
    under its Hugging Face name."""
    from transformers import AutoModelForTokenClassification

    torch.manual_seed(0)
    AutoModelForTokenClassification.from_pretrained(model_dir, num_labels=1).save_pretrained(tmp_path)
    hf, config = _hf(tmp_path)
    assert "score.weight" in hf and "lm_head.weight" not in hf
    shape = convert.ModelShape.from_hf_config(config)
    mg = convert.hf_to_megatron(hf, shape)
    assert torch.equal(mg["output_layer.score.weight"], hf["score.weight"])
    assert torch.equal(mg["output_layer.score.bias"], hf["score.bias"])
    assert convert.tp_split_dim("output_layer.score.weight") is None
    _assert_bitwise(convert.megatron_to_hf(mg, shape), hf)


def test_qwen3_moe_experts_round_trip(tmp_path):
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    config = Qwen3MoeConfig(
        vocab_size=200,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_experts=4,
        num_experts_per_tok=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    # The checkpoint files name every expert, as on the Hub (transformers 5 fuses them only in memory).
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    hf = checkpoint.read_hf_weights(tmp_path, flag="--hf-checkpoint")
    shape = convert.ModelShape.from_hf_config(config.to_dict())
    assert shape.num_experts == 4 and shape.qk_norm
    mg = convert.hf_to_megatron(hf, shape)
    assert mg["decoder.layers.1.mlp.experts.local_experts.3.linear_fc1.weight"].shape == (32, 32)
    assert torch.equal(mg["decoder.layers.0.mlp.router.weight"], hf["model.layers.0.mlp.gate.weight"])
    _assert_bitwise(convert.megatron_to_hf(mg, shape), hf)


@pytest.mark.parametrize("tp", [1, 2])
def test_tensor_parallel_shards_hold_whole_groups_and_their_own_gate_up(model_dir, tp):
    hf, config = _hf(model_dir)
    shape = convert.ModelShape.from_hf_config(config, tp_size=tp)
    mg = convert.hf_to_megatron(hf, shape)
    for name, tensor in mg.items():
        shards = convert.split_for_tp(name, tensor, tp)
        assert len(shards) == tp
        assert torch.equal(convert.gather_from_tp(name, shards), tensor), name
    qkv = convert.split_for_tp(
        "decoder.layers.0.self_attention.linear_qkv.weight",
        mg["decoder.layers.0.self_attention.linear_qkv.weight"],
        tp,
    )
    dim, groups = shape.head_dim, shape.num_key_value_heads // tp
    per_rank = convert.ModelShape(
        **{
            **shape.__dict__,
            "num_attention_heads": shape.num_attention_heads // tp,
            "num_key_value_heads": groups,
        }
    )
    q, k, v = (hf[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv")
    for r in range(tp):
        rows = slice(r * groups * shape.heads_per_group * dim, (r + 1) * groups * shape.heads_per_group * dim)
        kv_rows = slice(r * groups * dim, (r + 1) * groups * dim)
        assert torch.equal(qkv[r], convert.fuse_qkv(q[rows], k[kv_rows], v[kv_rows], per_rank))
    fc1 = convert.split_for_tp(
        "decoder.layers.0.mlp.linear_fc1.weight", mg["decoder.layers.0.mlp.linear_fc1.weight"], tp
    )
    gate, up = hf["model.layers.0.mlp.gate_proj.weight"], hf["model.layers.0.mlp.up_proj.weight"]
    for r in range(tp):
        assert torch.equal(fc1[r], torch.cat([gate.chunk(tp)[r], up.chunk(tp)[r]]))
    proj = convert.split_for_tp(
        "decoder.layers.0.self_attention.linear_proj.weight",
        mg["decoder.layers.0.self_attention.linear_proj.weight"],
        tp,
    )
    assert proj[0].shape == (shape.hidden_size, shape.hidden_size // tp)


@pytest.mark.parametrize("model_dir", ["qwen2"], indirect=True)
def test_tp_that_does_not_divide_the_heads_names_the_flag(model_dir):
    _, config = _hf(model_dir)
    with pytest.raises(ValueError, match="--tensor-model-parallel-size 4 must divide num_key_value_heads=2"):
        convert.check_tp_compatible(convert.ModelShape.from_hf_config(config, tp_size=4), 4)


@pytest.mark.parametrize("model_dir", ["qwen2"], indirect=True)
def test_pipeline_stages_renumber_layers_and_place_embeddings(model_dir):
    hf, config = _hf(model_dir)
    shape = convert.ModelShape.from_hf_config(config)
    mg = convert.hf_to_megatron(hf, shape)
    first, last = convert.stage_state(mg, shape, 2, 0), convert.stage_state(mg, shape, 2, 1)
    assert "embedding.word_embeddings.weight" in first and "decoder.final_layernorm.weight" not in first
    assert torch.equal(last["output_layer.weight"], mg["embedding.word_embeddings.weight"])  # tied copy
    assert torch.equal(
        last["decoder.layers.0.mlp.linear_fc2.weight"], mg["decoder.layers.2.mlp.linear_fc2.weight"]
    )
    with pytest.raises(ValueError, match="--pipeline-model-parallel-size 3"):
        convert.stage_layers(4, 3, 0)


@pytest.mark.parametrize(
    ("layers", "pp", "first", "last", "sizes"),
    [
        (4, 2, None, None, [2, 2]),
        (4, 2, 1, None, [1, 3]),
        (4, 2, None, 1, [3, 1]),
        (6, 3, 2, None, [2, 2, 2]),
        (4, 3, 2, None, [2, 1, 1]),
        (7, 3, 1, None, [1, 3, 3]),
        (8, 4, 1, 1, [1, 3, 3, 1]),
        (5, 2, 2, 3, [2, 3]),
    ],
)
def test_uneven_pipeline_stages_follow_megatron(layers, pp, first, last, sizes):
    """``--decoder-first/last-pipeline-num-layers`` as megatron-core splits: the given stages take their counts, the
    rest split evenly over the stages between."""
    assert convert.stage_sizes(layers, pp, first=first, last=last) == sizes
    starts = [sum(sizes[:r]) for r in range(pp)]
    for rank in range(pp):
        got = convert.stage_layers(layers, pp, rank, first=first, last=last)
        assert got == range(starts[rank], starts[rank] + sizes[rank])


@pytest.mark.parametrize(
    ("layers", "pp", "first", "last", "message"),
    [
        (4, 2, 1, 1, "--decoder-first-pipeline-num-layers 1 and --decoder-last-pipeline-num-layers 1 must add up to "
         "the model's 4 layers"),
        (8, 3, 1, None, "the other 7 of the model's 8 layers must split evenly over the 2 stages between"),
        (4, 2, 4, None, "--decoder-first-pipeline-num-layers 4 must be a whole number of layers from 1 to 3"),
        (4, 2, None, 0, "--decoder-last-pipeline-num-layers 0 must be"),
        (4, 1, 2, None, "--decoder-first-pipeline-num-layers needs --pipeline-model-parallel-size above 1"),
        (4, 3, 3, None, "the other 1 of the model's 4 layers must split evenly over the 2"),
    ],
)  # fmt: skip
def test_impossible_pipeline_splits_name_the_flags(layers, pp, first, last, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        convert.stage_sizes(layers, pp, first=first, last=last)


def _slime(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *argv], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize("model_dir", ["qwen3"], indirect=True)
def test_convert_commands_round_trip_bitwise_through_tp_and_pp_shards(model_dir, tmp_path):
    mcore, back = tmp_path / "mcore", tmp_path / "back"
    result = _slime(
        "convert", "hf-to-megatron", "--hf-checkpoint", str(model_dir), "--save", str(mcore),
        "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2", "--te-names",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (mcore / "latest_checkpointed_iteration.txt").read_text().strip() == "release"
    shard = torch.load(mcore / "release" / "mp_rank_01_001" / "model_optim_rng.pt", weights_only=True)[
        "model"
    ]
    assert "decoder.layers.1.self_attention.linear_qkv.layer_norm_weight" in shard
    assert "decoder.layers.2.self_attention.linear_qkv.weight" not in shard
    result = _slime(
        "convert",
        "megatron-to-hf",
        "--load",
        str(mcore),
        "--save",
        str(back),
        "--hf-checkpoint",
        str(model_dir),
    )
    assert result.returncode == 0, result.stderr
    _assert_bitwise(
        checkpoint.read_hf_weights(back, flag="x"), checkpoint.read_hf_weights(model_dir, flag="x")
    )
    assert (back / "tokenizer.json").is_file()
    config = json.loads((back / "config.json").read_text())
    assert config["vocab_size"] == json.loads((model_dir / "config.json").read_text())["vocab_size"]
    full, shape, _ = torch_format.read(mcore)
    assert shape.padded_vocab_size == 256 * ((shape.vocab_size + 255) // 256)
    assert full["embedding.word_embeddings.weight"].shape[0] == shape.padded_vocab_size


def test_convert_errors_are_one_line_and_help_skips_torch(tmp_path):
    result = _slime("convert", "megatron-to-hf", "--load", str(tmp_path), "--save", str(tmp_path / "out"))
    assert result.returncode == 1 and "not a Megatron release checkpoint" in result.stderr
    assert "Traceback" not in result.stderr
    probe = (
        "import sys; from services.cli import main\n"
        "try:\n    main(['convert', '--help'])\nexcept SystemExit:\n    pass\n"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip().endswith("False"), out.stdout + out.stderr


def _args(model_dir: Path, *extra: str) -> argparse.Namespace:
    return parse_args(
        ["--hf-checkpoint", str(model_dir), "--rollout-batch-size", "4", "--num-rollout", "1", *extra]
    )


@pytest.mark.parametrize("model_dir", ["qwen2"], indirect=True)
def test_hf_config_check_names_the_disagreeing_flags(model_dir):
    _, config = _hf(model_dir)
    arch = architecture_from_hf(config, padded_vocab=None, make_vocab_size_divisible_by=128, tp_size=1)
    kwargs = arch.transformer_config_kwargs()
    assert kwargs["num_query_groups"] == 2 and kwargs["kv_channels"] == 8 and kwargs["gated_linear_unit"]
    check_megatron_args(_args(model_dir), arch)  # nothing given: nothing to disagree with
    wrong = _args(model_dir, "--num-layers", "3", "--hidden-size", "32", "--num-attention-heads", "4")
    with pytest.raises(ValueError) as info:
        check_megatron_args(wrong, arch)
    message = str(info.value)
    assert "--num-layers 3 (the Hugging Face config has 4)" in message
    assert "--swiglu is missing" in message and "--normalization LayerNorm" in message
    assert "--hidden-size" not in message
    check_megatron_args(_args(model_dir, "--num-layers", "3", "--use-hf-config-for-megatron"), arch)


@pytest.mark.parametrize("model_dir", ["qwen2"], indirect=True)
def test_unsupported_rope_scaling_is_refused(model_dir):
    _, config = _hf(model_dir)
    config = {**config, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}
    with pytest.raises(ValueError, match="rope_scaling 'yarn'"):
        architecture_from_hf(config, padded_vocab=None, make_vocab_size_divisible_by=128, tp_size=1)


@pytest.mark.parametrize("model_dir", ["qwen2"], indirect=True)
def test_train_without_gpu_or_megatron_core_names_the_flag(model_dir, capsys):
    pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    from trainer.driver import main

    with pytest.raises(SystemExit) as info:
        main(
            [
                "--hf-checkpoint",
                str(model_dir),
                "--prompt-data",
                "x.jsonl",
                "--rollout-batch-size",
                "4",
                "--num-rollout",
                "1",
            ]
        )
    message = str(info.value)
    assert "--train-backend megatron (the default) needs a CUDA GPU and megatron-core" in message
    assert "no CUDA GPU is visible" in message and "--train-backend fsdp" in message
