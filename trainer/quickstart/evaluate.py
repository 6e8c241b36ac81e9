"""Held-out accuracy of a Hugging Face model on quick-start problems, graded by the reward model's ``math`` grader.

Used to check the warm start when it is built and to score models trained outside slime (the TRL benchmark) the
same way; the demo itself measures accuracy through its engines (``--eval-prompt-data``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from services.reward_model.graders.math import grade_math
from trainer.quickstart.task import Problem


def chat_prompt(tokenizer: Any, problem: Problem) -> str:
    """The prompt as the demo's engines see it with ``--apply-chat-template``."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": problem.prompt}], tokenize=False, add_generation_prompt=True
    )


def completions(
    model: Any,
    tokenizer: Any,
    problems: Sequence[Problem],
    *,
    temperature: float,
    max_new_tokens: int,
    seed: int = 0,
    batch_size: int = 256,
) -> list[str]:
    """One completion per problem: sampled at ``temperature``, or greedy when it is 0."""
    import torch

    torch.manual_seed(seed)
    tokenizer.padding_side = "left"
    out: list[str] = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(problems), batch_size):
            chunk = problems[start : start + batch_size]
            encoded = tokenizer(
                [chat_prompt(tokenizer, p) for p in chunk],
                return_tensors="pt",
                padding=True,
                add_special_tokens=False,
            ).to(model.device)
            sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
            with torch.no_grad():
                generated = model.generate(
                    **encoded,
                    max_new_tokens=max_new_tokens,
                    pad_token_id=tokenizer.pad_token_id,
                    **(sampling if temperature > 0 else {"do_sample": False}),
                )
            new_tokens = generated[:, encoded["input_ids"].shape[1] :]
            out.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    finally:
        model.train(was_training)
    return out


def accuracy(
    model: Any,
    tokenizer: Any,
    problems: Sequence[Problem],
    *,
    temperature: float,
    max_new_tokens: int,
    seed: int = 0,
) -> float:
    """Fraction of ``problems`` whose completion the ``math`` grader scores 1."""
    texts = completions(
        model, tokenizer, problems, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed
    )
    scores = [float(grade_math(text, str(p.answer))) for text, p in zip(texts, problems, strict=True)]
    return sum(scores) / len(scores)


def accuracy_of_dir(
    model_dir: str, problems: Sequence[Problem], *, temperature: float, max_new_tokens: int, seed: int = 0
) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return accuracy(
        model, tokenizer, problems, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed
    )
