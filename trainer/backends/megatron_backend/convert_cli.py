"""``slime convert hf-to-megatron`` and ``slime convert megatron-to-hf``: checkpoint conversion on any machine.

    slime convert hf-to-megatron --hf-checkpoint Qwen3-4B --save Qwen3-4B_mcore --tensor-model-parallel-size 2
    slime convert megatron-to-hf --load Qwen3-4B_mcore --save Qwen3-4B_back [--hf-checkpoint Qwen3-4B]

The Megatron side is Megatron's ``torch`` checkpoint format (``torch_format``); the Hugging Face side a model
directory with config, safetensors and, from ``--hf-checkpoint``, the tokenizer.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

COMMANDS = ("hf-to-megatron", "megatron-to-hf")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slime convert", description="Hugging Face ⇄ Megatron checkpoints.")
    sub = parser.add_subparsers(dest="direction", metavar="DIRECTION", required=True)
    to_mg = sub.add_parser("hf-to-megatron", help="a Hugging Face directory → a Megatron checkpoint")
    to_mg.add_argument("--hf-checkpoint", required=True, help="Hugging Face model directory to read.")
    to_mg.add_argument("--save", required=True, help="Directory to write the Megatron checkpoint to.")
    to_mg.add_argument("--tensor-model-parallel-size", type=int, default=1)
    to_mg.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    to_mg.add_argument("--padded-vocab-size", type=int, default=None)
    to_mg.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    to_mg.add_argument(
        "--te-names",
        action="store_true",
        help="Name norms as megatron-core's TransformerEngine spec does (fused into linear_qkv / linear_fc1).",
    )
    to_hf = sub.add_parser("megatron-to-hf", help="a Megatron checkpoint → a Hugging Face directory")
    to_hf.add_argument("--load", required=True, help="Megatron checkpoint written by hf-to-megatron.")
    to_hf.add_argument("--save", required=True, help="Hugging Face directory to write.")
    to_hf.add_argument(
        "--hf-checkpoint", default=None, help="Hugging Face directory to copy the tokenizer from (optional)."
    )
    to_hf.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="Cast the weights on export.",
    )
    return parser


def hf_to_megatron(args: argparse.Namespace) -> Path:
    from trainer import checkpoint
    from trainer.backends.megatron_backend import convert, torch_format

    config = json.loads((Path(args.hf_checkpoint) / "config.json").read_text())
    shape = convert.ModelShape.from_hf_config(
        config,
        padded_vocab=args.padded_vocab_size,
        make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
        tp_size=args.tensor_model_parallel_size,
    )
    hf = checkpoint.read_hf_weights(args.hf_checkpoint, flag="--hf-checkpoint")
    mg = convert.hf_to_megatron(hf, shape)
    out = torch_format.write(
        args.save,
        mg,
        shape,
        hf_config=config,
        tp_size=args.tensor_model_parallel_size,
        pp_size=args.pipeline_model_parallel_size,
        te_names=args.te_names,
    )
    logger.info(
        "wrote %s: %d tensors, TP=%d PP=%d, vocabulary %d padded to %d",
        out,
        len(mg),
        args.tensor_model_parallel_size,
        args.pipeline_model_parallel_size,
        shape.vocab_size,
        shape.padded_vocab_size,
    )
    return out


def megatron_to_hf(args: argparse.Namespace) -> Path:
    import torch
    from transformers import AutoConfig

    from trainer import checkpoint
    from trainer.backends.megatron_backend import convert, torch_format

    mg, shape, config_dict = torch_format.read(args.load)
    hf = convert.megatron_to_hf(mg, shape)
    config_cls = type(AutoConfig.for_model(config_dict["model_type"]))
    config = config_cls.from_dict(config_dict)
    architecture = (
        config_dict.get("architectures") or [config_cls.__name__.replace("Config", "ForCausalLM")]
    )[0]
    out = checkpoint.write_hf_checkpoint(
        args.save,
        hf,
        config=config,
        architecture=architecture,
        tokenizer_source=args.hf_checkpoint,
        dtype=None if args.dtype is None else getattr(torch, args.dtype),
    )
    logger.info("wrote %s: %d tensors", out, len(hf))
    return out


def main(argv: Sequence[str]) -> int:
    args = _parser().parse_args(list(argv))
    from services.core.logging_setup import setup_logging

    setup_logging("INFO", service="convert")
    try:
        if args.direction == "hf-to-megatron":
            hf_to_megatron(args)
        else:
            megatron_to_hf(args)
    except (FileNotFoundError, KeyError, ValueError) as exc:
        sys.stderr.write(f"slime convert {args.direction}: error: {exc}\n")
        return 1
    return 0
