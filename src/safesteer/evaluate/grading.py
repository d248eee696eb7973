"""Grading answers and summarising grades: answer extraction, correctness, confidence intervals.

Pure Python on the answers and scores a model produced (the model-facing scoring is
:mod:`safesteer.evaluate.capability`), so the benchmark registry can import it without torch.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation

from safesteer.errors import SafesteerError
from safesteer.gold import MultipleChoiceQuestion

_ANSWER_MARKER = re.compile(r"####|answer is|answer:|\\boxed\{", re.IGNORECASE)
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+")
_CODE_BLOCK = re.compile(r"```[^\n`]*\n(.*?)```", re.DOTALL)


# --- answer extraction ----------------------------------------------------------------------------


def extract_final_number(text: str) -> str | None:
    """The final numeric answer in ``text``, commas removed; None when there is no number.

    The first number after the last answer marker ("####", "answer is", "answer:", "\\boxed{")
    wins, so trailing checks ("The answer is 42. Check: 6 * 7 = 42") do not matter; without a
    marker, the last number in the text.
    """
    markers = list(_ANSWER_MARKER.finditer(text))
    if markers:
        after = _NUMBER.search(text, markers[-1].end())
        if after:
            return after.group().replace(",", "")
    numbers = _NUMBER.findall(text)
    return numbers[-1].replace(",", "") if numbers else None


def gsm8k_exact_match(generated_text: str, gold: str) -> bool:
    """Whether the final number of ``generated_text`` equals ``gold`` numerically (5.00 == 5)."""
    predicted = extract_final_number(generated_text)
    if predicted is None:
        return False
    try:
        return Decimal(predicted) == Decimal(gold.replace(",", "").strip())
    except InvalidOperation:
        return False


def extract_code(response: str) -> str:
    """The first fenced code block of a chat answer, else the whole answer (a bare completion)."""
    block = _CODE_BLOCK.search(response)
    return block.group(1) if block else response


# --- multiple choice ------------------------------------------------------------------------------


def correct_choices(scores: Sequence[Sequence[float]],
                    questions: Sequence[MultipleChoiceQuestion]) -> list[bool]:
    """Per question, whether its most likely letter (of its options only; a tie goes to the
    earlier letter) is the correct one; ``scores`` from
    :func:`~safesteer.evaluate.capability.choice_logprobs`."""
    return [max(range(len(row)), key=row.__getitem__) == question.answer
            for row, question in zip(scores, questions, strict=True)]


# --- confidence intervals -------------------------------------------------------------------------


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a proportion (95 % at z = 1.96); (0, 1) when n = 0.

    Unlike the normal (Wald) interval it stays inside [0, 1] and is not degenerate at 0/n or n/n,
    which matters for refusal and accuracy rates near the ends on 100-item benchmarks.
    """
    if not 0 <= successes <= n:
        raise SafesteerError(f"need 0 <= successes <= n, got {successes} of {n}")
    if n == 0:
        return 0.0, 1.0
    rate = successes / n
    spread = z * z / n
    centre = (rate + spread / 2) / (1 + spread)
    half_width = z * math.sqrt(rate * (1 - rate) / n + spread / (4 * n)) / (1 + spread)
    return max(0.0, centre - half_width), min(1.0, centre + half_width)


def mean_confidence_interval(values: Sequence[float], z: float = 1.96) -> tuple[float, float, float]:
    """(mean, low, high) for per-item continuous values, e.g. per-item NLL or KL.

    Normal approximation: mean ± z·s/√n with the sample standard deviation s (n − 1), justified
    by the central limit theorem for the ~100+ items here; NaN values (empty answers) are dropped.
    The bounds are NaN below two values.
    """
    finite = [value for value in values if not math.isnan(value)]
    if not finite:
        raise SafesteerError("no values to average")
    mean = sum(finite) / len(finite)
    if len(finite) < 2:
        return mean, math.nan, math.nan
    variance = sum((value - mean) ** 2 for value in finite) / (len(finite) - 1)
    half_width = z * math.sqrt(variance / len(finite))
    return mean, mean - half_width, mean + half_width
