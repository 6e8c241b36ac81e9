"""A verifiable arithmetic task: prompts whose answers the ``math`` reward checks from ``\\boxed{…}``.

Problems are two-operand additions and subtractions; the expected completion is just the boxed result, so a tiny
model can learn the format quickly and the reward measures arithmetic alone. ``sft_rows`` writes the warm-start
data: conversations whose answers are exact only some of the time and otherwise a near miss, so the warm-started
model knows roughly where each answer lies but not exactly (see ``docs/quickstart.md``).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

OPS = "+-"


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
        return boxed(self.answer)


def boxed(value: int) -> str:
    return f"\\boxed{{{value}}}"


@dataclass(frozen=True)
class TaskSpec:
    """Which problems exist and which are held out; the quick start's data files are built from ``QUICKSTART``."""

    max_operand: int
    ops: str = OPS
    eval_size: int = 200
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_operand < 1:
            raise ValueError(f"max_operand must be at least 1, got {self.max_operand}")
        if not self.ops or set(self.ops) - set(OPS):
            raise ValueError(f"ops must be a non-empty string of {OPS!r}, got {self.ops!r}")
        total = len(self.ops) * (self.max_operand + 1) ** 2
        if not 0 < self.eval_size < total:
            raise ValueError(f"eval_size must be in (0, {total}) for {total} problems, got {self.eval_size}")

    def split(self) -> tuple[list[Problem], list[Problem]]:
        return split_problems(self.max_operand, eval_size=self.eval_size, seed=self.seed, ops=self.ops)


QUICKSTART = TaskSpec(max_operand=99, ops="+", eval_size=200, seed=0)


def all_problems(max_operand: int, ops: str = OPS) -> list[Problem]:
    return [Problem(a, b, op) for op in ops for a in range(max_operand + 1) for b in range(max_operand + 1)]


def split_problems(
    max_operand: int, *, eval_size: int, seed: int = 0, ops: str = OPS
) -> tuple[list[Problem], list[Problem]]:
    """Shuffle every problem once and hold ``eval_size`` of them out; train and eval never share a problem."""
    problems = all_problems(max_operand, ops)
    random.Random(seed).shuffle(problems)
    return problems[eval_size:], problems[:eval_size]


def near_miss(problem: Problem, rng: random.Random, offsets: Sequence[int]) -> int:
    """A wrong answer a fixed small distance from the right one."""
    return problem.answer + rng.choice(offsets)


def sft_rows(
    problems: Iterable[Problem],
    *,
    exact_fraction: float,
    offsets: Sequence[int] = (-1, 1),
    copies: int = 1,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """``copies`` chat conversations per problem (OpenAI ``messages``), each answered exactly with ``exact_fraction``
    probability and otherwise off by one of ``offsets``, drawn independently, so the data shows the answer
    distribution rather than one fixed wrong answer per problem. The label column always holds the exact answer."""
    if not 0.0 <= exact_fraction <= 1.0:
        raise ValueError(f"exact_fraction must be in [0, 1], got {exact_fraction}")
    if 0 in offsets or not offsets:
        raise ValueError(
            f"offsets must be non-empty and non-zero (they make wrong answers), got {list(offsets)}"
        )
    if copies < 1:
        raise ValueError(f"copies must be at least 1, got {copies}")
    rng = random.Random(seed)
    rows = []
    for problem in (p for p in problems for _ in range(copies)):
        value = problem.answer if rng.random() < exact_fraction else near_miss(problem, rng, offsets)
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": problem.prompt},
                    {"role": "assistant", "content": boxed(value)},
                ],
                "label": str(problem.answer),
            }
        )
    return rows


def prompt_rows(problems: Iterable[Problem]) -> list[dict[str, Any]]:
    """RL and eval rows: the question in ``prompt`` and the exact answer in ``label`` (for ``--rm-type math``)."""
    return [{"prompt": p.prompt, "label": str(p.answer)} for p in problems]


def write_rows(rows: Iterable[dict[str, Any]], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    return path


def write_jsonl(problems: Iterable[Problem], path: str | Path) -> Path:
    return write_rows(prompt_rows(problems), path)
