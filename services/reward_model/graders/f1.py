"""slime's ``f1`` reward: SQuAD-style token F1 between the response and the label."""

from __future__ import annotations

import re
import string
from collections import Counter

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
# A yes/no (or "no answer") question is right or wrong: partial token overlap with it earns nothing.
_CLOSED_ANSWERS = frozenset({"yes", "no", "noanswer"})


def normalize_tokens(text: str) -> list[str]:
    """Lower-case, drop punctuation and English articles, split on whitespace (SQuAD's normalisation)."""
    text = "".join(char for char in text.lower() if char not in _PUNCTUATION)
    return _ARTICLES.sub(" ", text).split()


def f1_parts(prediction: str | None, ground_truth: str | None) -> tuple[float, float, float]:
    """(f1, precision, recall) of the normalised token bags."""
    if prediction is None:
        return 0.0, 0.0, 0.0
    predicted = normalize_tokens(prediction)
    expected = normalize_tokens(ground_truth or "")
    predicted_text, expected_text = " ".join(predicted), " ".join(expected)
    if (
        predicted_text in _CLOSED_ANSWERS or expected_text in _CLOSED_ANSWERS
    ) and predicted_text != expected_text:
        return 0.0, 0.0, 0.0
    overlap = sum((Counter(predicted) & Counter(expected)).values())
    if overlap == 0:
        return 0.0, 0.0, 0.0
    precision = overlap / len(predicted)
    recall = overlap / len(expected)
    return 2 * precision * recall / (precision + recall), precision, recall


def grade_f1(response: str, label: str | float | int | None) -> float:
    return f1_parts(response, None if label is None else str(label))[0]
