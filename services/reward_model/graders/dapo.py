"""slime's ``dapo`` reward: the last ``Answer:`` line, Minerva-normalised, against an integer label.

Returns a dict ``{"score": 1.0 | -1.0, "acc": bool, "pred": str}``; select the number with ``--reward-key score``.
"""

from __future__ import annotations

import re

from services.reward_model.graders.math import last_boxed_answer

# The longest MATH-500 answer has 159 characters; only the tail of a response can hold the final answer.
TAIL_CHARS = 300
ANSWER_RE = re.compile(r"(?i)Answer\s*:\s*([^\n]+)")
INVALID = "[INVALID]"

# Minerva's normalisation (Lewkowycz et al., 2022, appendix D): spelling variants first, then unit and filler
# words that answer keys never contain.
_REPLACEMENTS = (
    ("an ", ""),
    ("a ", ""),
    (".$", "$"),
    ("\\$", ""),
    ("\\ ", ""),
    (" ", ""),
    ("mbox", "text"),
    (",\\text{and}", ","),
    ("\\text{and}", ","),
    ("\\text{m}", "\\text{}"),
)
_DROPPED = (
    "square",
    "ways",
    "integers",
    "dollars",
    "mph",
    "inches",
    "hours",
    "km",
    "units",
    "\\ldots",
    "sue",
    "points",
    "feet",
    "minutes",
    "digits",
    "cents",
    "degrees",
    "cm",
    "gm",
    "pounds",
    "meters",
    "meals",
    "edges",
    "students",
    "childrentickets",
    "multiples",
    "\\text{s}",
    "\\text{.}",
    "\\text{\ns}",
    "\\text{}^2",
    "\\text{}^3",
    "\\text{\n}",
    "\\text{}",
    "\\mathrm{th}",
    "^\\circ",
    "^{\\circ}",
    "\\;",
    ",\\!",
    "{,}",
    '"',
    "\\dots",
    "<|im_end|>",
    "<|endoftext|>",
)


def normalize_final_answer(answer: str) -> str:
    """Minerva's normalisation of a final answer: what remains is compared as a plain string."""
    answer = str(answer).split("=")[-1]
    for before, after in _REPLACEMENTS:
        answer = answer.replace(before, after)
    for word in _DROPPED:
        answer = answer.replace(word, "")
    answer = re.sub(r"(.*?)(\$)(.*?)(\$)(.*)", r"$\3$", answer)
    for command in ("text", "textbf", "overline"):
        answer = re.sub(r"(\\" + command + r"\{)(.*?)(\})", r"\2", answer)
    answer = re.sub(r"(\\boxed\{)(.*)(\})", r"\2", answer)
    # Shorthand TeX: \fracab -> \frac{a}{b}, \sqrta -> \sqrt{a}.
    answer = re.sub(r"(frac)([^{])(.)", r"frac{\2}{\3}", answer)
    answer = re.sub(r"(sqrt)([^{])", r"sqrt{\2}", answer)
    answer = answer.replace("$", "")
    if answer.replace(",", "").isdigit():
        answer = answer.replace(",", "")
    return answer.strip()


def integer_label(label: str | float | int | None) -> str:
    """DAPO's labels are integers: ``"42"``, ``"42.0"`` and ``"\\boxed{42}"`` all mean ``"42"``."""
    if label is None:
        raise ValueError("dapo needs an integer label, got none")
    text = str(label)
    if "\\boxed" in text:
        text = last_boxed_answer(text) or ""
    normalized = normalize_final_answer(text)
    try:
        return str(int(float(normalized)))
    except ValueError:
        raise ValueError(f"dapo needs an integer label, got {label!r}") from None


def grade_dapo(response: str, label: str | float | int | None) -> dict:
    """``{"score": 1.0, "acc": True, "pred": ...}`` when the last ``Answer:`` equals the label, else score -1.0."""
    matches = ANSWER_RE.findall(response[-TAIL_CHARS:])
    pred = normalize_final_answer(matches[-1]) if matches else normalize_final_answer(INVALID)
    correct = pred == integer_label(label)
    return {"score": 1.0 if correct else -1.0, "acc": correct, "pred": pred}
