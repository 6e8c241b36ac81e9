"""Math answer grading as slime's ``math`` reward: the last ``\\boxed{}`` answer, matched by normalised string or
by sympy equivalence.

sympy can take unbounded time (or memory) on adversarial answers, so these functions are meant to run inside the
grader process pool (``services.reward_model.pool``), which kills a worker that exceeds the per-item timeout.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

# A normalised answer longer than this is not a final answer but prose; sympy is not worth its risk on it.
MAX_SYMPY_CHARS = 400

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_SPACING_COMMANDS = ("\\!", "\\,", "\\;", "\\:", "\\quad", "\\qquad")
_TEXT_COMMANDS = ("text", "textbf", "textit", "mathrm", "mathbf", "mbox", "operatorname")
_FUNCTION_COMMANDS = {"ln": "log", "log": "log", "exp": "exp", "sin": "sin", "cos": "cos", "tan": "tan"}
_SYMBOL_COMMANDS = {
    "pi": "pi",
    "infty": "oo",
    "cdot": "*",
    "times": "*",
    "ast": "*",
    "div": "/",
    "circ": "",
    "%": "",
    "$": "",
    "{": "{",
    "}": "}",
}
_LAYOUT_COMMANDS = frozenset(
    ("left", "right", "big", "Big", "bigl", "bigr", "Bigl", "Bigr", "displaystyle", "mathbb", "quad", "qquad")
)
_UNITS = (
    "degree",
    "cm",
    "centimeter",
    "meter",
    "mile",
    "second",
    "minute",
    "hour",
    "day",
    "week",
    "month",
    "year",
    "foot",
    "feet",
    "inch",
    "yard",
)
_UNIT_RE = re.compile(r"(?<![a-z])(?:" + "|".join(_UNITS) + r")(?:e?s)?(?![a-z]) *(?:\^[0-9]+)?")
_MULTIPLIERS = (("trillion", "*10^12"), ("billion", "*10^9"), ("million", "*10^6"))
# Answers that would make sympy build astronomically large integers (towers, long exponents) are compared as
# strings only; the process pool's timeout covers what these patterns miss.
_UNSAFE_SUBSTRINGS = ("^{", "^(")
_UNSAFE_PATTERNS = (re.compile(r"\^[0-9]+\^"), re.compile(r"\^[0-9][0-9]+"))
_THOUSANDS_RE = re.compile(r"(\d),(\d\d\d)($|\D)")
_FRACTION_RE = re.compile(r"^-?[0-9]+.?/0*[1-9][0-9]*.?$")
_BRACKETS = "()[]"


def last_boxed_answer(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``, or ``\\boxed x``) in ``text``; None without one."""
    for command in _BOX_COMMANDS:
        start = text.rfind(command)
        if start >= 0:
            break
    else:
        return None
    rest = text[start + len(command) :]
    if rest.startswith("{"):
        return _braced_group(rest, 0)[0]
    bare = re.match(r"\s+([^\s$]+)", rest)
    return bare.group(1) if bare else None


def _braced_group(text: str, open_index: int) -> tuple[str | None, int]:
    """The content of the brace group opening at ``open_index`` and the index after its closing brace."""
    depth = 0
    for index in range(open_index, len(text)):
        char = text[index]
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[open_index + 1 : index], index + 1
    return None, len(text)


def _argument(text: str, index: int) -> tuple[str | None, int]:
    """A LaTeX macro argument at ``index``: a brace group, or else the single next character."""
    while index < len(text) and text[index] == " ":
        index += 1
    if index >= len(text):
        return None, index
    if text[index] == "{":
        return _braced_group(text, index)
    return text[index], index + 1


def _brace_macro_arguments(text: str, macro: str, count: int) -> str:
    """Rewrite ``\\frac12`` as ``\\frac{1}{2}`` (and ``\\sqrt3`` as ``\\sqrt{3}``) so both spellings compare equal."""
    pieces = text.split(macro)
    out = [pieces[0]]
    for piece in pieces[1:]:
        out.append(macro)
        index = 0
        arguments = []
        for _ in range(count):
            if piece[index : index + 1] == "[":
                break
            argument, index = _argument(piece, index)
            if argument is None:
                break
            arguments.append(argument)
        if len(arguments) < count:
            out.append(piece)
            continue
        out.append("".join("{" + argument + "}" for argument in arguments) + piece[index:])
    return "".join(out)


def _slash_to_frac(text: str) -> str:
    numerator, slash, denominator = text.partition("/")
    if not slash or "/" in denominator:
        return text
    if re.fullmatch(r"-?\d+", numerator) and re.fullmatch(r"\d+", denominator):
        return "\\frac{" + numerator + "}{" + denominator + "}"
    return text


def normalize_answer_string(answer: str) -> str:
    """Hendrycks MATH-style normalisation: two answers equal after this are the same answer written alike."""
    answer = answer.strip()
    wrapped = re.fullmatch(r"\\text\{(.+?)\}", answer)
    if wrapped:
        answer = wrapped.group(1).strip()
    text = answer.replace("\n", "").replace("\\\\", "\\")
    for command in _SPACING_COMMANDS:
        text = text.replace(command, "")
    text = text.replace("tfrac", "frac").replace("dfrac", "frac")
    text = text.replace("\\left", "").replace("\\right", "")
    text = text.replace("^{\\circ}", "").replace("^\\circ", "")
    text = text.replace("\\$", "")
    # "\text{ " only introduces a unit after the value ("5\text{ cm}"), never part of the value itself.
    text = text.split("\\text{ ")[0]
    text = text.replace("\\%", "")
    text = text.replace(" .", " 0.").replace("{.", "{0.")
    if not text:
        return text
    if text[0] == ".":
        text = "0" + text
    lhs, equals, rhs = text.partition("=")
    if equals and "=" not in rhs and len(lhs) <= 2:
        text = rhs
    text = _brace_macro_arguments(text, "\\sqrt", 1)
    text = text.replace("\\ ", "").replace("~", "").replace(" ", "")
    text = _brace_macro_arguments(text, "\\frac", 2)
    if text == "0.5":
        text = "\\frac{1}{2}"
    return _slash_to_frac(text)


def _is_simple_token(text: str) -> bool:
    return bool(re.fullmatch(r"-?[0-9.]+|[A-Za-z]", text))


def _wrap(text: str) -> str:
    return text if _is_simple_token(text) else "(" + text + ")"


def latex_to_expression(latex: str) -> str:
    """Translate the LaTeX of a final answer into the plain infix text that sympy's parser reads."""
    out: list[str] = []
    index = 0
    while index < len(latex):
        char = latex[index]
        if char == "\\":
            match = re.match(r"\\([A-Za-z]+|.?)", latex[index:])
            name = match.group(1) if match else ""
            text, index = _translate_command(name, latex, index + 1 + len(name), "".join(out))
            out.append(text)
        elif char in "^_" and latex[index + 1 : index + 2] == "{":
            group, index = _braced_group(latex, index + 1)
            inner = latex_to_expression(group or "")
            out.append(char + _wrap(inner))
        else:
            out.append(char)
            index += 1
    return "".join(out).strip()


def _translate_command(name: str, latex: str, index: int, before: str) -> tuple[str, int]:
    """The plain text for the command ``\\name`` whose arguments start at ``index``, and the index after them."""
    if name in ("frac", "dfrac", "tfrac"):
        numerator, index = _argument(latex, index)
        denominator, index = _argument(latex, index)
        top = latex_to_expression(numerator or "")
        bottom = latex_to_expression(denominator or "")
        fraction = _wrap(top) + "/" + _wrap(bottom)
        # "3\\frac{1}{2}" is the mixed number 3 + 1/2, the way answer keys write it.
        if before.rstrip()[-1:].isdigit() and top.isdigit() and bottom.isdigit():
            return "+" + fraction, index
        return fraction, index
    if name == "sqrt":
        degree = ""
        if latex[index : index + 1] == "[":
            close = latex.find("]", index)
            close = close if close > 0 else len(latex)
            degree = latex_to_expression(latex[index + 1 : close])
            index = close + 1
        radicand, index = _argument(latex, index)
        inner = latex_to_expression(radicand or "")
        if degree:
            return "(" + inner + ")^(1/" + _wrap(degree) + ")", index
        return "sqrt(" + inner + ")", index
    if name in _TEXT_COMMANDS:
        content, index = _argument(latex, index)
        return latex_to_expression(content or ""), index
    if name in _FUNCTION_COMMANDS:
        return _FUNCTION_COMMANDS[name], index
    if name in _SYMBOL_COMMANDS:
        return _SYMBOL_COMMANDS[name], index
    # Layout-only commands (\\left, \\big, spacing) and unknown symbols carry no value; an unknown word such as
    # \\alpha stays as letters, which the unknown-letter limit then weighs.
    if name in _LAYOUT_COMMANDS or not name.isalpha():
        return "", index
    return name, index


def _strip_thousands_separators(text: str) -> str:
    while True:
        stripped = _THOUSANDS_RE.sub(r"\1\2\3", text)
        if stripped == text:
            return text
        text = stripped


def _as_number(text: str) -> float | None:
    try:
        return float(_strip_thousands_separators(text))
    except ValueError:
        return None


def _is_integer_text(text: str) -> bool:
    value = _as_number(text)
    return value is not None and abs(value - round(value)) <= 1e-7


def canonical_expression(answer: str) -> str:
    """Normalise an answer for sympy: units, percent, dollars and LaTeX dropped, integers in plain digits."""
    wrapped = re.fullmatch(r"\\text\{(.+?)\}", answer)
    if wrapped:
        answer = wrapped.group(1)
    text = answer.replace("\\%", "").replace("\\$", "").replace("$", "").replace("%", "")
    text = text.replace(" or ", " , ").replace(" and ", " , ")
    for word, power in _MULTIPLIERS:
        text = text.replace(word, power)
    text = _UNIT_RE.sub("", text)
    text = re.sub(r"\^ *\\circ", "", text)
    if len(text) > 1 and text[0] == "{" and text[-1] == "}":
        text = text[1:-1]
    text = re.sub(r",\\! *", "", text)
    number = _as_number(text)
    if number is not None and _is_integer_text(text):
        text = str(int(round(number)))
    if "\\" in text:
        text = latex_to_expression(text)
    text = re.sub(r"- *", "-", text)
    # "7 3/4" is the mixed number 7 + 3/4.
    text = re.sub(r"([0-9]) +([0-9])", r"\1+\2", text)
    text = text.replace(" ", "").replace("{", "").replace("}", "").lower()
    if _is_integer_text(text):
        text = str(int(round(float(_strip_thousands_separators(text)))))
    return text


def _split_elements(text: str) -> list[str]:
    """Elements of a tuple or interval ``(a,b]``; a single answer is a list of one."""
    text = _strip_thousands_separators(text)
    if not text:
        return []
    if (
        len(text) > 2
        and text[0] in _BRACKETS
        and text[-1] in _BRACKETS
        and not any(c in text[1:-1] for c in _BRACKETS)
    ):
        return [element.strip() for element in text[1:-1].split(",")]
    return [text]


def _unknown_letter_count(text: str) -> int:
    for name in ("sqrt", "frac", "pi", "oo", "log", "exp", "sin", "cos", "tan"):
        text = text.replace(name, "")
    return len({char for char in text if char.isalpha()})


def _sympy_allowed(text: str) -> bool:
    if len(text) > MAX_SYMPY_CHARS or _unknown_letter_count(text) > 2:
        return False
    if any(bad in text for bad in _UNSAFE_SUBSTRINGS):
        return False
    return not any(pattern.search(text) for pattern in _UNSAFE_PATTERNS)


@lru_cache(maxsize=1)
def _parser_namespace() -> dict[str, Any]:
    import sympy

    # sympy names only and no builtins: parse_expr evaluates its input, and the input is model output.
    return {"__builtins__": {}, **{k: v for k, v in vars(sympy).items() if not k.startswith("_")}}


def _sympy_equal(truth: str, given: str) -> bool:
    difference = f"({truth})-({given})"
    if not _sympy_allowed(difference):
        return False
    # Imported here, not at the top: only grader worker processes (which preload it) ever get this far, and the
    # service's own process is spared sympy's second of import time.
    import sympy
    from sympy.parsing import sympy_parser

    try:
        parsed = sympy_parser.parse_expr(
            difference.replace("^", "**"),
            local_dict={},
            global_dict=dict(_parser_namespace()),
            transformations=(
                *sympy_parser.standard_transformations,
                sympy_parser.implicit_multiplication_application,
            ),
        )
        return bool(sympy.simplify(parsed) == 0)
    except Exception:
        # Unparseable or unsimplifiable text is simply not shown equal.
        return False


def _elements_equal(truth: str, given: str) -> bool:
    if truth == given:
        return True
    if _FRACTION_RE.match(truth) and _FRACTION_RE.match(given):
        # An unreduced fraction is not the expected answer even though its value is.
        return False
    if _is_integer_text(truth) != _is_integer_text(given):
        # An integer answer must be given as that integer, not as an expression that simplifies to it.
        return False
    return _sympy_equal(truth, given)


def equivalent_by_sympy(given: str, truth: str) -> bool:
    """True when ``given`` and ``truth`` denote the same value (or tuple/interval of values) under sympy."""
    truth_text = canonical_expression(truth)
    given_text = canonical_expression(given)
    if truth_text == given_text:
        return True
    if not given_text or not truth_text:
        return False
    truth_elements = _split_elements(truth_text)
    given_elements = _split_elements(given_text)
    if len(truth_elements) > 1 and (truth_text[0] != given_text[0] or truth_text[-1] != given_text[-1]):
        return False
    if len(truth_elements) != len(given_elements):
        return False
    return all(_elements_equal(t, g) for t, g in zip(truth_elements, given_elements, strict=True))


def equivalent_by_string(given: str, truth: str) -> bool:
    return normalize_answer_string(given) == normalize_answer_string(truth)


def answers_match(given: str, truth: str) -> bool:
    """slime's rule for an extracted answer: normalised strings equal, or sympy shows the values equal."""
    return equivalent_by_string(given, truth) or equivalent_by_sympy(given, truth)


def ground_truth_answer(label: str | float | int | None) -> str | None:
    """The answer a label holds: the label itself, or the content of its ``\\boxed{}`` when it has one."""
    if label is None or label == "":
        return None
    truth = str(label)
    if "\\boxed" in truth:
        return last_boxed_answer(truth)
    return truth


def grade_math(response: str, label: str | float | int | None) -> int:
    """slime's ``math`` reward: 1 when the last ``\\boxed{}`` answer of ``response`` matches ``label``, else 0."""
    truth = ground_truth_answer(label)
    if not truth:
        return 0
    given = last_boxed_answer(response)
    if given is None:
        return 0
    return 1 if answers_match(given, truth) else 0
