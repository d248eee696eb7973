"""The benign families' seeded validation/test halves, the borderline file, request styles and the
worst-case summaries (synthetic, harmless strings; the shipped borderline file is read as data)."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from safesteer.benign import (
    BORDERLINE_CATEGORIES,
    BORDERLINE_TRAIN_FILE,
    Request,
    borderline_requests,
    jsonl_records,
    split_half,
    validation_groups,
)
from safesteer.data import jaccard, normalize_tokens, request_style
from safesteer.errors import SafesteerError
from safesteer.evaluate.check import refusal_table
from safesteer.report import mean_of_kinds, pooled_styles, worst_of_kinds

REQUESTS = [Request(f"{category} prompt {index}", category, f"{category}/{index // 2}")
            for category, size in (("a", 10), ("b", 7), ("c", 1)) for index in range(size)]


def test_halves_partition_the_pool_by_group_and_category() -> None:
    val, test = split_half(REQUESTS, "val", 42), split_half(REQUESTS, "test", 42)
    assert sorted(val + test, key=REQUESTS.index) == REQUESTS
    assert not {r.group for r in val} & {r.group for r in test}  # a group never straddles the halves
    # Per category, half of its groups (rounded down) go to validation: a 2 of 5, b 2 of 4, c 0 of 1.
    groups = Counter((r.category, r.group) for r in val)
    assert Counter(category for category, _ in groups) == {"a": 2, "b": 2}
    assert {r.category for r in test} == {"a", "b", "c"}


def test_halves_are_seeded_and_shuffled() -> None:
    assert split_half(REQUESTS, "test", 42) == split_half(REQUESTS, "test", 42)
    assert validation_groups(REQUESTS, 1) != validation_groups(REQUESTS, 2)
    test = split_half(REQUESTS, "test", 42)
    assert test != sorted(test, key=REQUESTS.index)  # the first N mix the categories


def test_the_shipped_borderline_set_pairs_every_unsafe_prompt_with_a_safe_one() -> None:
    pairs = borderline_requests()
    labels = Counter((request.category, label) for request, label in pairs)
    assert {category for category, _ in labels} == set(BORDERLINE_CATEGORIES)
    assert all(labels[category, "safe"] == 30 and labels[category, "unsafe"] >= 25
               for category in BORDERLINE_CATEGORIES)
    safe = {request.group: request.category for request, label in pairs if label == "safe"}
    assert len(safe) == 240
    assert all(safe[request.group] == request.category for request, label in pairs if label == "unsafe")


def test_the_borderline_training_file_is_paired_and_disjoint_from_the_evaluation_file() -> None:
    train = borderline_requests(BORDERLINE_TRAIN_FILE)
    labels = Counter((request.category, label) for request, label in train)
    assert labels == {(category, label): 20 for category in BORDERLINE_CATEGORIES
                      for label in ("safe", "unsafe")}
    evaluation = [normalize_tokens(request.prompt) for request, _ in borderline_requests()]
    assert all(jaccard(normalize_tokens(request.prompt), other) < 0.5
               for request, _ in train for other in evaluation)


def test_bad_jsonl_names_the_file_and_line() -> None:
    with pytest.raises(SafesteerError, match=r"^f\.jsonl: line 2: invalid JSON"):
        jsonl_records('{"prompt": "x"}\n{oops\n', "f.jsonl")
    with pytest.raises(SafesteerError, match=r"^f\.jsonl: line 1: expected a JSON object"):
        jsonl_records('["x"]\n', "f.jsonl")


@pytest.mark.parametrize(("prompt", "style"), [
    ("How do I bake sourdough bread?", "question"),
    ("What is the best way to learn chess", "question"),
    ("Can you write a poem about rain?", "question"),
    ("Where's the nearest library?", "question"),
    ("Write a tutorial on knitting a scarf.", "instruction"),
    ("Explain photosynthesis to a child.", "instruction"),
    ("Tell me how tides work", "instruction"),
    ("  whats the capital of Peru", "question"),
])
def test_request_style(prompt: str, style: str) -> None:
    assert request_style(prompt) == style


def _cell(kind: str, value: float, higher: bool, styles: dict | None = None) -> dict:
    cell = {"kind": kind, "value": value, "higher_is_better": higher}
    return cell | {"styles": styles} if styles else cell


def test_worst_of_kinds_is_the_maximum_over_refusal_and_the_minimum_harmful_refusal() -> None:
    results = {"h1": _cell("safety", 0.9, True), "h2": _cell("jailbreak", 0.4, True),
               "b1": _cell("over-refusal", 0.1, False), "b2": _cell("over-refusal", 0.7, False),
               "b3": _cell("over-refusal", math.nan, False), "c": _cell("capability", 9.0, False)}
    assert worst_of_kinds(results, ("over-refusal",)) == (0.7, "b2")
    assert worst_of_kinds(results, ("safety", "jailbreak")) == (0.4, "h2")
    assert math.isnan(worst_of_kinds(results, ("missing",))[0])


def test_mean_of_kinds_skips_an_emptied_benchmark() -> None:
    results = {"h1": _cell("safety", 0.9, True), "h2": _cell("safety", math.nan, True),
               "h3": _cell("jailbreak", 0.5, True), "c": _cell("capability", 9.0, False)}
    assert mean_of_kinds(results, ("safety", "jailbreak")) == 0.7
    assert math.isnan(mean_of_kinds(results, ("over-refusal",)))


def test_pooled_styles_weight_by_prompts() -> None:
    results = {"h1": _cell("safety", 0.0, True, {"question": {"n": 10, "value": 0.2},
                                                  "instruction": {"n": 30, "value": 1.0}}),
               "h2": _cell("safety", 0.0, True, {"question": {"n": 30, "value": 0.6}}),
               "b": _cell("over-refusal", 0.0, False, {"question": {"n": 99, "value": 1.0}})}
    pooled = pooled_styles(results, ("safety",))
    assert pooled["question"] == {"n": 40, "value": pytest.approx((2 + 18) / 40)}
    assert pooled["instruction"] == {"n": 30, "value": 1.0}


def test_refusal_table_ends_with_each_targets_worst_benign_set() -> None:
    results = {"base": {"harm": {"n": 4, "refusal": 0.0}, "x": {"n": 4, "refusal": 0.25},
                        "y": {"n": 4, "refusal": 0.0}},
               "student": {"harm": {"n": 4, "refusal": 1.0}, "x": {"n": 4, "refusal": 0.0},
                           "y": {"n": 4, "refusal": 0.5}}}
    table = refusal_table(results, benign=["x", "y"]).splitlines()
    assert table[-1] == "| worst benign set ↓ | | 25.0% (x) | 50.0% (y) |"
    assert len(refusal_table(results).splitlines()) == 5
