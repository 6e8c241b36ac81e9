"""slime's ``deepscaler`` reward: the answer after the reasoning (``</think>`` or ``###Response``), graded as math."""

from __future__ import annotations

from services.reward_model.graders.math import answers_match, ground_truth_answer, last_boxed_answer

THINK_END = "</think>"
RESPONSE_MARKER = "###Response"


def solution_part(response: str) -> str | None:
    """The text after the model's reasoning; None when the response has neither marker (it never finished)."""
    if THINK_END in response:
        return response.rsplit(THINK_END, 1)[1]
    if RESPONSE_MARKER in response:
        return response.split(RESPONSE_MARKER)[1]
    return None


def grade_deepscaler(response: str, label: str | float | int | None) -> int:
    """1 when the last ``\\boxed{}`` after the reasoning matches ``label`` (string or sympy), else 0."""
    solution = solution_part(response)
    if solution is None:
        return 0
    given = last_boxed_answer(solution)
    truth = ground_truth_answer(label)
    if given is None or not truth:
        return 0
    return 1 if answers_match(given, truth) else 0
