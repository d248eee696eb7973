"""The sections of a comparison directory (``safesteer compare``): the method table, the Pareto
plot and one section per method (its training run, when it trains), each method's name in the
table linking to its section.

Drawn from ``compare.json``, ``runs/NAME/`` and the shared evaluation in ``eval/``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from safesteer.htmlreport.eval_view import eval_sections, value_cell
from safesteer.htmlreport.page import (
    Markup,
    anchor_id,
    definitions,
    figures,
    note,
    number,
    percent,
    section,
    table,
    tag,
)
from safesteer.htmlreport.run_view import Section, run_sections
from safesteer.htmlreport.sources import COMPARE_FILE, RESULTS_FILE, is_run_dir, load
from safesteer.htmlreport.svg import Point, scatter_chart


def method_anchor(name: str) -> str:
    return anchor_id("method", name)


def _dominance(row: Mapping[str, Any]) -> str:
    dominated = row.get("dominated_by")
    return "n/a" if dominated is None else ", ".join(dominated) or "— (Pareto front)"


def method_table(rows: Sequence[Mapping[str, Any]]) -> Markup:
    gpu = any(row.get("peak_gpu_mib") is not None for row in rows)
    body = [
        [
            tag("a", row["method"], href=f"#{method_anchor(row['method'])}"),
            percent(row["harmful_refusal"]),
            percent(row["over_refusal"]),
            number(row["capability_drift"], 1),
            number(row.get("train_seconds"), 0),
            number(row.get("eval_seconds"), 0),
            number(row.get("peak_rss_mib"), 0),
            *([number(row.get("peak_gpu_mib"), 0)] if gpu else []),
            _dominance(row),
        ]
        for row in rows
    ]
    header = [
        "method",
        "harmful refusal ↑",
        "over-refusal, max ↓",
        "capability drift % ↓",
        "train s",
        "eval s",
        "peak RSS MiB",
        *(["peak GPU MiB"] if gpu else []),
        "dominated by",
    ]
    return table(header, body)


def pareto_plot(rows: Sequence[Mapping[str, Any]]) -> str:
    """Capability drift across, mean harmful refusal up, worst over-refusal as the shade; the
    methods no other dominates on all three axes ringed."""
    over = [row["over_refusal"] for row in rows if math.isfinite(row["over_refusal"])]
    top = max(over, default=0.0) or 1.0
    points = [
        Point(
            row["method"],
            row["capability_drift"],
            100 * row["harmful_refusal"],
            ringed=row.get("dominated_by") == [],
            shade=row["over_refusal"] / top if math.isfinite(row["over_refusal"]) else None,
        )
        for row in rows
    ]
    return scatter_chart(
        "safety vs capability drift",
        points,
        "capability drift: gold-answer NLL vs base (%) ↓",
        "mean harmful refusal (%) ↑",
        f"worst over-refusal, 0 to {percent(top, 0)}",
        y_range=(-5.0, 105.0),
    )


def method_section(
    directory: Path,
    name: str,
    entry: Mapping[str, Any],
    row: Mapping[str, Any] | None,
    cells: Mapping[str, Any],
) -> Markup:
    """A method's description, its numbers on every benchmark and, for a trained method, its run."""
    anchor = method_anchor(name)
    about = definitions(
        [
            ("kind", str(entry.get("kind", "?"))),
            ("description", str(entry.get("description") or "—")),
            *([("dominated by", _dominance(row))] if row else []),
        ]
    )
    numbers = (
        table(["benchmark", "value"], [[bench, value_cell(cell)] for bench, cell in cells.items()])
        if cells
        else note("Not in the evaluation.")
    )
    run_dir = directory / "runs" / name
    parts: list[Markup] = [about, numbers]
    if is_run_dir(run_dir):
        parts += [
            body
            for _, _, body in run_sections(run_dir, anchor, level=3, only=("settings", "curves", "costs"))
        ]
    parts.append(tag("p", tag("a", "back to the method table", href="#compare-methods")))
    return section(anchor, f"Method: {name}", *parts)


def compare_sections(directory: Path) -> list[Section]:
    comparison = load(directory / COMPARE_FILE) or {}
    rows = comparison.get("rows") or []
    methods = comparison.get("methods") or {row["method"]: {} for row in rows}
    settings = comparison.get("settings") or {}
    seconds = comparison.get("seconds") or {}
    evaluation = directory / "eval"
    results = (load(evaluation / RESULTS_FILE) or {}).get("results") or {}
    about = (
        f"Model {settings.get('model', '?')}, preset {settings.get('preset', '?')}"
        f"{' (--quick)' if settings.get('quick') else ''}; wall time "
        f"{number(seconds.get('total'), 0)} s in all."
    )
    by_name = {row["method"]: row for row in rows}
    sections: list[Section] = [
        (
            "compare-methods",
            "Methods",
            section(
                "compare-methods",
                "Methods",
                note(about),
                method_table(rows),
                note(
                    "Harmful refusal: mean over the safety and jailbreak benchmarks; over-refusal: the "
                    "worst benign set; capability drift: mean relative change of the gold-answer NLLs "
                    "against the base. Each method name links to its section."
                ),
            ),
        ),
        (
            "compare-pareto",
            "Pareto plot",
            section("compare-pareto", "Pareto plot", figures([pareto_plot(rows)])),
        ),
    ]
    sections += [
        (
            method_anchor(name),
            f"Method: {name}",
            method_section(directory, name, entry, by_name.get(name), results.get(name, {})),
        )
        for name, entry in methods.items()
    ]
    if (evaluation / RESULTS_FILE).is_file():
        sections += eval_sections(evaluation)
    return sections
