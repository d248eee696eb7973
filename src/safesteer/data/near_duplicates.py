"""The near-duplicate rule of docs/data.md §9: token-set Jaccard similarity, greedy de-duplication
and removal of items near a reference set, so that no evaluation prompt leaks into a training set.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

DEDUP_THRESHOLD = 0.5
NEAR_THRESHOLD = 0.6

_NON_ALPHANUMERIC = re.compile(r"[^\w\s]|_")


def words(text: str) -> list[str]:
    """Lower-cased words with non-alphanumerics stripped, in order."""
    return _NON_ALPHANUMERIC.sub("", text.lower()).split()


def normalize_tokens(text: str) -> frozenset[str]:
    """Token set used for near-duplicate checks: lower-cased, non-alphanumerics stripped."""
    return frozenset(words(text))


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    """Token-set Jaccard similarity; two empty sets count as identical (1.0)."""
    if not a and not b:
        return 1.0
    shared = len(a & b)
    return shared / (len(a) + len(b) - shared)


def _has_near(tokens: frozenset[str], others: Iterable[frozenset[str]], threshold: float) -> bool:
    """Whether any of ``others`` has Jaccard >= threshold to ``tokens``.

    Jaccard can't exceed the ratio of the smaller set size to the larger, so most pairs are
    rejected on sizes alone, before the intersection is built.
    """
    size = len(tokens)
    for other in others:
        small, large = (size, len(other)) if size <= len(other) else (len(other), size)
        if large and small / large < threshold:
            continue
        if jaccard(tokens, other) >= threshold:
            return True
    return False


def dedup_indices(token_sets: Sequence[frozenset[str]], threshold: float) -> list[int]:
    """Indices :func:`dedup` keeps, for callers that de-duplicate items tagged with their group."""
    kept: list[int] = []
    kept_sets: list[frozenset[str]] = []
    for index, tokens in enumerate(token_sets):
        if not _has_near(tokens, kept_sets, threshold):
            kept.append(index)
            kept_sets.append(tokens)
    return kept


def dedup(prompts: Sequence[str], threshold: float = DEDUP_THRESHOLD) -> list[str]:
    """Greedy internal de-dup: keep a prompt only if its Jaccard to each kept one is < threshold."""
    kept = dedup_indices([normalize_tokens(prompt) for prompt in prompts], threshold)
    return [prompts[index] for index in kept]


def remove_near(
    items: Sequence[str], references: Sequence[str], threshold: float = NEAR_THRESHOLD
) -> tuple[list[str], int]:
    """Drop items with Jaccard >= threshold to any reference; return the rest and how many went."""
    reference_sets = [normalize_tokens(reference) for reference in references]
    kept = []
    for item in items:
        tokens = normalize_tokens(item)
        if not _has_near(tokens, reference_sets, threshold):
            kept.append(item)
    return kept, len(items) - len(kept)
