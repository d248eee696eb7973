"""Prompt sets: local prompt files, the pinned offline sets and the project's seeded splits.

The package in reading order: ``formats`` (local files), ``near_duplicates`` (the rule of
docs/data.md §9), ``sources`` (pinned wheels and hub twins), ``splits`` (docs/data.md §6, §10),
``suites`` (the over-refusal proxy and jailbreak suites, docs/data.md §4, §5), ``labels`` (category
and request style), ``registry`` (names to loaders, and :func:`load_prompts`). The names below are
the public ones; code inside safesteer imports from the module that defines each.
"""

from safesteer.data.formats import PROMPT_SUFFIXES, csv_table, load_prompt_file
from safesteer.data.labels import prompt_categories, request_style
from safesteer.data.near_duplicates import dedup, jaccard, normalize_tokens, remove_near
from safesteer.data.registry import DatasetInfo, check_prompt_source, list_datasets, load_prompts
from safesteer.data.sources import DATA_SOURCES
from safesteer.data.splits import prompts_sha256, split_report
from safesteer.data.suites import fill_template

__all__ = [
    "DATA_SOURCES",
    "PROMPT_SUFFIXES",
    "DatasetInfo",
    "check_prompt_source",
    "csv_table",
    "dedup",
    "fill_template",
    "jaccard",
    "list_datasets",
    "load_prompt_file",
    "load_prompts",
    "normalize_tokens",
    "prompt_categories",
    "prompts_sha256",
    "remove_near",
    "request_style",
    "split_report",
]
