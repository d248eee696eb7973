"""Markdown tables of an evaluation, drawn from its ``results.json`` cells alone."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from safesteer.evaluate.benchmarks import lookup
from safesteer.report import HARMFUL_KINDS, Results, pooled_styles, worst_of_kinds


def results_table(results: dict[str, dict[str, Any]], benchmarks: Sequence[str]) -> str:
    """Markdown: one row per benchmark, one column per target, value with its 95 % interval."""
    targets = list(results)
    lines = ["| benchmark | kind | metric | n | " + " | ".join(targets) + " |",
             "|---|---|---|---:|" + "---:|" * len(targets)]
    for name in benchmarks:
        benchmark = lookup(name)
        arrow = "↑" if benchmark.higher_is_better else "↓"
        cells = [_cell(results[target][name]) for target in targets]
        n = results[targets[0]][name]["n"]
        lines.append(f"| {name} | {benchmark.kind} | {benchmark.metric} {arrow} | {n} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def target_summary(results: Results) -> dict[str, Any]:
    """The worst case of each side, as a user meets it: the harmful set refused least, the benign
    set refused most, and harmful refusal per request style pooled over the harmful sets."""
    harmful, weakest = worst_of_kinds(results, HARMFUL_KINDS)
    over_refusal, worst = worst_of_kinds(results, ("over-refusal",))
    return {"harmful_refusal_min": harmful, "harmful_min_benchmark": weakest,
            "over_refusal_max": over_refusal, "over_refusal_max_benchmark": worst,
            "harmful_styles": pooled_styles(results, HARMFUL_KINDS)}


def summary_table(summaries: dict[str, dict[str, Any]]) -> str:
    """Markdown: per target the weakest harmful set, harmful refusal per style, the worst benign set."""
    def rate(value: float, where: str | None = None) -> str:
        return "n/a" if math.isnan(value) else f"{value:.1%}" + (f" ({where})" if where else "")

    lines = ["| target | harmful refusal, weakest set ↑ | question-style ↑ | instruction-style ↑ | "
             "over-refusal, worst benign set ↓ |", "|---|---:|---:|---:|---:|"]
    for name, summary in summaries.items():
        styles = summary["harmful_styles"]
        style_cells = [rate(styles[style]["value"]) + f" of {styles[style]['n']}" if style in styles
                       else "n/a" for style in ("question", "instruction")]
        lines.append(f"| {name} | {rate(summary['harmful_refusal_min'], summary['harmful_min_benchmark'])} | "
                     + " | ".join(style_cells) + " | "
                     + f"{rate(summary['over_refusal_max'], summary['over_refusal_max_benchmark'])} |")
    return "\n".join(lines)


def robustness_table(results: dict[str, dict[str, Any]]) -> str:
    """Markdown: per robustness benchmark and target, refusal under the attack and its drop from
    the same prompts unattacked (docs/method.md §8.1); empty without robustness benchmarks."""
    targets = list(results)
    attacks = [name for name, row in results[targets[0]].items() if row["kind"] == "robustness"]
    if not attacks:
        return ""
    lines = ["| attack (on --attack-prompts) | n | " + " | ".join(f"{t}: refusal ↑ (drop ↓)" for t in targets)
             + " |", "|---|---:|" + "---:|" * len(targets)]
    for name in attacks:
        cells = []
        for target in targets:
            row = results[target][name]
            cells.append("n/a" if math.isnan(row["value"]) else
                         f"{row['value']:.1%} ({100 * row['drop']:+.1f} pt)")
        lines.append(f"| {name} | {results[targets[0]][name]['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def category_table(results: dict[str, dict[str, Any]]) -> str:
    """Markdown: refusal rate per category of every benchmark whose source records categories."""
    targets = list(results)
    lines = ["| benchmark | category | n | " + " | ".join(targets) + " |",
             "|---|---|---:|" + "---:|" * len(targets)]
    for name, row in results[targets[0]].items():
        for category, cell in row.get("categories", {}).items():
            rates = " | ".join(f"{results[t][name]['categories'][category]['value']:.0%}" for t in targets)
            lines.append(f"| {name} | {category} | {cell['n']} | {rates} |")
    return "\n".join(lines)


def _cell(result: dict[str, Any]) -> str:
    value, (low, high) = result["value"], result["ci"]
    if math.isnan(value):
        return "n/a"
    if result["metric"] in ("NLL / token", "KL / token"):
        return f"{value:.3f}" if math.isnan(low) else f"{value:.3f} [{low:.3f}, {high:.3f}]"
    return f"{value:.1%} [{low:.0%}, {high:.0%}]"
