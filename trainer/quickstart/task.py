"""A verifiable arithmetic task: prompts whose answers the ``math`` reward checks from ``\\boxed{…}``.

Problems are two-operand additions and subtractions over small integers; the expected completion is just the boxed
result, so a tiny model can learn the format quickly and the reward measures arithmetic alone.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Problem:
    a: int
    b: int
    op: str

    @property
    def answer(self) -> int:
        return self.a + self.b if self.op == "+" else self.a - self.b

    @property
    def prompt(self) -> str:
        return f"{self.a}{self.op}{self.b}="

    @property
    def completion(self) -> str:
        return f"\\boxed{{{self.answer}}}"


def all_problems(max_operand: int, ops: str = "+-") -> list[Problem]:
    return [Problem(a, b, op) for op in ops for a in range(max_operand + 1) for b in range(max_operand + 1)]


def split_problems(
    max_operand: int, *, eval_size: int, seed: int = 0, ops: str = "+-"
) -> tuple[list[Problem], list[Problem]]:
    """Shuffle every problem once and hold ``eval_size`` of them out; train and eval never share a problem."""
    problems = all_problems(max_operand, ops)
    random.Random(seed).shuffle(problems)
    return problems[eval_size:], problems[:eval_size]


def write_jsonl(problems: list[Problem], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for p in problems:
            fh.write(json.dumps({"prompt": p.prompt, "label": str(p.answer)}) + "\n")
    return path
