"""Rebuild the quick start's data and warm-started model: ``python -m trainer.quickstart.build_model``.

Writes ``train.jsonl``/``eval.jsonl`` (RL prompts and held-out problems), ``model/`` (a tiny Qwen2 model with its
own tokenizer and chat template, fine-tuned with slime's SFT path, ``--loss-type sft_loss``, through ``slime train``
and exported in Hugging Face format) and ``build_report.json`` (the recipe and the warm start's held-out accuracy).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from trainer.quickstart.task import QUICKSTART, Problem, TaskSpec, prompt_rows, sft_rows, write_rows

logger = logging.getLogger(__name__)

EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "examples" / "quickstart"
# Qwen's ChatML template as Qwen3 writes it for a conversation without tools: no default system prompt, which
# would otherwise be most of every prompt's tokens.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# "\boxed{198}" and the end-of-turn token are 7 tokens; the demo's --rollout-max-response-len is the same 8.
MAX_RESPONSE_TOKENS = 8


@dataclass(frozen=True)
class ModelRecipe:
    """Shape of the tiny model (``services.core.tiny_model.build_tiny_model``)."""

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 384
    vocab_size: int = 320
    seed: int = 0


@dataclass(frozen=True)
class SftRecipe:
    """The warm start: ``exact_fraction`` of answers exact, the rest off by one of ``offsets``.

    Each problem appears ``copies`` times with independently drawn answers and is seen once (one epoch): the model
    learns how often answers are off rather than which problems are, so the bias it learns is the same on problems
    it has never seen, and RL can remove it everywhere.
    """

    exact_fraction: float = 0.3
    offsets: tuple[int, ...] = (1,)
    copies: int = 20
    epochs: int = 1
    batch_size: int = 64
    micro_batch_size: int = 32
    lr: float = 3e-3
    seed: int = 0


def tokenizer_corpus(problems: Sequence[Problem]) -> list[str]:
    """Text shaped like the chat-formatted conversations, so the BPE learns the task's frequent pieces."""
    return [f"user\n{p.prompt}\nassistant\n{p.completion}\n" for p in problems[:2000]]


def set_chat_template(model_dir: Path, template: str = CHAT_TEMPLATE) -> None:
    """Replace the template ``build_tiny_model`` wrote, in both places transformers reads it from."""
    config_path = model_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = template
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    jinja = model_dir / "chat_template.jinja"
    if jinja.exists():
        jinja.write_text(template)


def sft_argv(model_dir: Path, data: Path, out_dir: Path, export_dir: Path, sft: SftRecipe) -> list[str]:
    """``slime train`` flags of slime's SFT recipe: no generation, a masked cross-entropy on assistant turns."""
    return [
        "--train-backend",
        "fsdp",
        "--hf-checkpoint",
        str(model_dir),
        "--prompt-data",
        str(data),
        "--input-key",
        "messages",
        "--label-key",
        "label",
        "--rollout-function-path",
        "slime.rollout.sft_rollout.generate_rollout",
        "--loss-type",
        "sft_loss",
        "--loss-mask-type",
        "qwen",
        "--disable-compute-advantages-and-returns",
        "--debug-train-only",
        "--rollout-shuffle",
        "--rollout-seed",
        str(sft.seed),
        "--seed",
        str(sft.seed),
        "--rollout-batch-size",
        str(sft.batch_size),
        "--n-samples-per-prompt",
        "1",
        "--global-batch-size",
        str(sft.batch_size),
        "--micro-batch-size",
        str(sft.micro_batch_size),
        "--num-epoch",
        str(sft.epochs),
        "--lr",
        str(sft.lr),
        "--lr-decay-style",
        "cosine",
        "--min-lr",
        str(sft.lr / 10),
        "--lr-warmup-iters",
        "20",
        "--clip-grad",
        "1.0",
        "--weight-decay",
        "0.0",
        "--actor-num-gpus-per-node",
        "1",
        "--distributed-backend",
        "gloo",
        "--output-dir",
        str(out_dir),
        "--save-hf",
        str(export_dir),
        "--log-level",
        "WARNING",
    ]


@dataclass
class BuildReport:
    task: dict
    model: dict
    sft: dict
    parameters: int
    sft_seconds: float
    held_out_accuracy_sampled: float
    held_out_accuracy_greedy: float


def build(
    out_dir: Path,
    *,
    task: TaskSpec = QUICKSTART,
    model: ModelRecipe | None = None,
    sft: SftRecipe | None = None,
) -> BuildReport:
    """Write the data files and the warm-started model under ``out_dir`` and measure the warm start."""
    from services.core.tiny_model import build_tiny_model
    from trainer.driver import main as train_main
    from trainer.quickstart.evaluate import accuracy_of_dir

    model = model or ModelRecipe()
    sft = sft or SftRecipe()
    out_dir.mkdir(parents=True, exist_ok=True)
    train, held_out = task.split()
    write_rows(prompt_rows(train), out_dir / "train.jsonl")
    write_rows(prompt_rows(held_out), out_dir / "eval.jsonl")
    with tempfile.TemporaryDirectory(prefix="slime-quickstart-") as tmp:
        work = Path(tmp)
        # The SFT data is a few MB and rebuilt from the seed, so it stays out of examples/.
        sft_data = write_rows(
            sft_rows(
                train,
                exact_fraction=sft.exact_fraction,
                offsets=sft.offsets,
                copies=sft.copies,
                seed=sft.seed,
            ),
            work / "sft.jsonl",
        )
        init = build_tiny_model(
            work / "init",
            arch="qwen2",
            hidden_size=model.hidden_size,
            num_layers=model.num_layers,
            num_heads=model.num_heads,
            num_kv_heads=model.num_kv_heads,
            intermediate_size=model.intermediate_size,
            max_position_embeddings=128,
            seed=model.seed,
            corpus=tokenizer_corpus(train),
            vocab_size=model.vocab_size,
        )
        set_chat_template(init)
        export = work / "export"
        start = time.perf_counter()
        status = train_main(sft_argv(init, sft_data, work / "sft", export, sft), "sync")
        if status != 0:
            raise RuntimeError(f"the SFT run failed with status {status}; its logs are in {work / 'sft'}")
        sft_seconds = time.perf_counter() - start
        target = out_dir / "model"
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(export, target)
    config = json.loads((target / "config.json").read_text())
    parameters = _parameter_count(target)
    report = BuildReport(
        task=asdict(task),
        model=asdict(model),
        sft=asdict(sft),
        parameters=parameters,
        sft_seconds=round(sft_seconds, 1),
        held_out_accuracy_sampled=accuracy_of_dir(
            str(target), held_out, temperature=1.0, max_new_tokens=MAX_RESPONSE_TOKENS
        ),
        held_out_accuracy_greedy=accuracy_of_dir(
            str(target), held_out, temperature=0.0, max_new_tokens=MAX_RESPONSE_TOKENS
        ),
    )
    (out_dir / "build_report.json").write_text(json.dumps(asdict(report), indent=2) + "\n")
    logger.info(
        "warm start: %s, %d parameters, SFT %.0fs; held-out accuracy %.1f%% sampled, %.1f%% greedy",
        config.get("architectures"),
        parameters,
        sft_seconds,
        100 * report.held_out_accuracy_sampled,
        100 * report.held_out_accuracy_greedy,
    )
    return report


def _parameter_count(model_dir: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as fh:
        return sum(math.prod(fh.get_slice(name).get_shape()) for name in fh.keys())  # noqa: SIM118


def _parser() -> argparse.ArgumentParser:
    model, sft = ModelRecipe(), SftRecipe()
    parser = argparse.ArgumentParser(
        prog="python -m trainer.quickstart.build_model",
        description="Rebuild the quick-start data files and warm-started model.",
    )
    parser.add_argument(
        "--out-dir", type=Path, default=EXAMPLES_DIR, help="Where to write (examples/quickstart)."
    )
    parser.add_argument("--max-operand", type=int, default=QUICKSTART.max_operand)
    parser.add_argument("--ops", default=QUICKSTART.ops, help="Operations of the task: '+', '-' or '+-'.")
    parser.add_argument("--eval-size", type=int, default=QUICKSTART.eval_size, help="Held-out problems.")
    parser.add_argument("--hidden-size", type=int, default=model.hidden_size)
    parser.add_argument("--num-layers", type=int, default=model.num_layers)
    parser.add_argument("--intermediate-size", type=int, default=model.intermediate_size)
    parser.add_argument("--exact-fraction", type=float, default=sft.exact_fraction)
    parser.add_argument("--copies", type=int, default=sft.copies)
    parser.add_argument("--epochs", type=int, default=sft.epochs)
    parser.add_argument("--lr", type=float, default=sft.lr)
    parser.add_argument("--batch-size", type=int, default=sft.batch_size)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from services.core.logging_setup import setup_logging

    opts = _parser().parse_args(argv)
    setup_logging("INFO", service="quickstart")
    task = TaskSpec(
        max_operand=opts.max_operand, ops=opts.ops, eval_size=opts.eval_size, seed=QUICKSTART.seed
    )
    model = ModelRecipe(
        hidden_size=opts.hidden_size, num_layers=opts.num_layers, intermediate_size=opts.intermediate_size
    )
    sft = SftRecipe(
        exact_fraction=opts.exact_fraction,
        copies=opts.copies,
        epochs=opts.epochs,
        lr=opts.lr,
        batch_size=opts.batch_size,
    )
    report = build(opts.out_dir, task=task, model=model, sft=sft)
    sys.stdout.write(json.dumps(asdict(report), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
