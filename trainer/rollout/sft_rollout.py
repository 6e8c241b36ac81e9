"""slime's SFT "rollout": no generation, each prompt row is a conversation turned into tokens and a loss mask.

Used with ``--loss-type sft_loss --disable-compute-advantages-and-returns`` (and usually ``--debug-train-only``): the
``--input-key`` column holds OpenAI-style ``messages``; assistant turns are trained on, as masked by
``--loss-mask-type``.
"""

from __future__ import annotations

from typing import Any

from rollout_buffer.loss_mask import MultiTurnLossMaskGenerator
from services.core.sample import Sample
from trainer.data import RolloutDataSource

_GENERATORS: dict[tuple[str, str], MultiTurnLossMaskGenerator] = {}


def _mask_generator(args: Any) -> MultiTurnLossMaskGenerator:
    cache_key = (args.hf_checkpoint, args.loss_mask_type)
    if cache_key not in _GENERATORS:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.hf_checkpoint)
        _GENERATORS[cache_key] = MultiTurnLossMaskGenerator(tokenizer, tokenizer_type=args.loss_mask_type)
    return _GENERATORS[cache_key]


def generate_rollout(
    args: Any, rollout_id: int, data_source: RolloutDataSource, evaluation: bool = False
) -> list[list[Sample]]:
    if evaluation:
        raise ValueError("the SFT rollout has no eval mode: set --eval-function-path to a generating rollout")
    generator = _mask_generator(args)
    groups = data_source.get_samples(args.rollout_batch_size)
    for group in groups:
        for sample in group:
            messages = sample.prompt
            if not isinstance(messages, list):
                raise ValueError(
                    f"SFT data needs a list of messages in --input-key {args.input_key!r}, got {type(messages).__name__}"
                )
            tokens, mask = generator.get_loss_mask(messages)
            length = generator.get_response_lengths([mask])[0]
            sample.tokens = tokens
            sample.response_length = length
            sample.loss_mask = mask[len(mask) - length :]
            sample.reward = 0.0
            sample.status = Sample.Status.COMPLETED
    return groups
