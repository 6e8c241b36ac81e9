"""Rule-based graders by ``--rm-type`` name, and ``grade()``, the one entry point the process pool runs."""

from __future__ import annotations

from collections.abc import Callable

from services.reward_model.graders.dapo import grade_dapo
from services.reward_model.graders.deepscaler import grade_deepscaler
from services.reward_model.graders.f1 import grade_f1
from services.reward_model.graders.math import grade_math, last_boxed_answer

Reward = int | float | dict
Grader = Callable[[str, str | float | int | None], Reward]

BOXED_PREFIX = "boxed_"
RULE_BASED: dict[str, Grader] = {
    "math": grade_math,
    "deepscaler": grade_deepscaler,
    "dapo": grade_dapo,
    "f1": grade_f1,
}


def split_boxed(rm_type: str) -> tuple[bool, str]:
    """``"boxed_f1"`` -> ``(True, "f1")``: the prefix asks to grade only the last ``\\boxed{}`` content."""
    if rm_type.startswith(BOXED_PREFIX):
        return True, rm_type[len(BOXED_PREFIX) :]
    return False, rm_type


def grade(rm_type: str, response: str, label: str | float | int | None) -> Reward:
    """Score one response with the rule-based grader ``rm_type`` (``boxed_`` prefix allowed)."""
    boxed, base = split_boxed(rm_type)
    grader = RULE_BASED.get(base)
    if grader is None:
        raise ValueError(f"{rm_type!r} is not a rule-based reward type; valid: {sorted(RULE_BASED)}")
    if boxed:
        response = last_boxed_answer(response) or ""
    return grader(response, label)


def grade_many(items: list[tuple[str, str, str | float | int | None]]) -> list[Reward]:
    """:func:`grade` of each ``(rm_type, response, label)``: a grader worker's one round trip for many items."""
    return [grade(rm_type, response, label) for rm_type, response, label in items]


def failure_reward(rm_type: str) -> Reward:
    """The reward of an item whose grading failed: the grader's own "wrong answer" value, never better."""
    _, base = split_boxed(rm_type)
    if base == "dapo":
        return {"score": -1.0, "acc": False, "pred": ""}
    return 0
