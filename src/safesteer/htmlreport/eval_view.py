"""The sections of an evaluation directory: the results with their intervals, the per-target
summary and per-category tables, the plots, and an answers browser that sets the targets'
answers to the same prompts side by side.

Drawn from ``results.json`` and ``completions/`` alone. Answers are untrusted model output: they
are only ever inserted as escaped text.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from safesteer.htmlreport.page import Markup, figures, join, note, number, percent, section, table, tag
from safesteer.htmlreport.run_view import Section
from safesteer.htmlreport.sources import RESULTS_FILE, load, load_lines
from safesteer.htmlreport.svg import Bar, Point, bar_chart, scatter_chart
from safesteer.keyword_judge import is_refusal
from safesteer.report import HARMFUL_KINDS, capability_score, mean_of_kinds

ANSWERED_KINDS = ("safety", "jailbreak", "over-refusal", "robustness")  # benchmarks whose answers are judged
PER_TOKEN = ("NLL / token", "KL / token")


def is_rate(cell: Mapping[str, Any]) -> bool:
    return cell["metric"] not in PER_TOKEN


def value_cell(cell: Mapping[str, Any]) -> Markup:
    """The value with its 95 % interval underneath, in % for rates and accuracies."""
    value, (low, high) = cell["value"], cell.get("ci", (math.nan, math.nan))
    if math.isnan(value):
        return Markup("n/a")
    shown = percent if is_rate(cell) else number
    interval = "" if math.isnan(low) else f"[{shown(low)}, {shown(high)}]"
    return join(
        [shown(value), Markup("<br>"), tag("span", interval, class_="ci")] if interval else [shown(value)]
    )


def results_table(results: Mapping[str, Mapping[str, Any]], benchmarks: Mapping[str, Any]) -> Markup:
    targets = list(results)
    rows = []
    for name, record in benchmarks.items():
        cells = [results[target].get(name) for target in targets]
        first = next((cell for cell in cells if cell), None)
        if first is None:
            continue
        arrow = "↑" if record.get("higher_is_better") else "↓"
        rows.append(
            [
                name,
                record.get("kind", ""),
                f"{record.get('metric', '')} {arrow}",
                str(first["n"]),
                *(value_cell(cell) if cell else "—" for cell in cells),
            ]
        )
    return table(["benchmark", "kind", "metric", "n", *targets], rows, numeric_from=3)


def summary_table(summary: Mapping[str, Mapping[str, Any]]) -> Markup:
    """Per target: the harmful set refused least, harmful refusal per request style, the benign set
    refused most (the worst cases; a mean would hide them)."""

    def worst(value: float, where: str | None) -> str:
        return percent(value) + (f" ({where})" if where else "")

    rows = []
    for target, row in summary.items():
        styles = row.get("harmful_styles", {})
        rows.append(
            [
                target,
                worst(row["harmful_refusal_min"], row.get("harmful_min_benchmark")),
                *(
                    f"{percent(styles[style]['value'])} of {styles[style]['n']:.0f}"
                    if style in styles
                    else "n/a"
                    for style in ("question", "instruction")
                ),
                worst(row["over_refusal_max"], row.get("over_refusal_max_benchmark")),
            ]
        )
    return table(
        [
            "target",
            "harmful refusal, weakest set ↑",
            "question-style ↑",
            "instruction-style ↑",
            "over-refusal, worst benign set ↓",
        ],
        rows,
    )


def category_table(results: Mapping[str, Mapping[str, Any]]) -> Markup | None:
    targets = list(results)
    rows = [
        [
            name,
            category,
            str(cell["n"]),
            *(
                percent(
                    results[target]
                    .get(name, {})
                    .get("categories", {})
                    .get(category, {})
                    .get("value", math.nan),
                    0,
                )
                for target in targets
            ),
        ]
        for name, row in results[targets[0]].items()
        for category, cell in row.get("categories", {}).items()
    ]
    return table(["benchmark", "category", "n", *targets], rows, numeric_from=2) if rows else None


def bar_plots(results: Mapping[str, Mapping[str, Any]], benchmarks: Mapping[str, Any]) -> list[str]:
    """One bar chart per benchmark, a bar per target with its 95 % interval; rates in %."""
    charts = []
    for name, record in benchmarks.items():
        cells = {target: cells[name] for target, cells in results.items() if name in cells}
        if not cells:
            continue
        scale = 100.0 if is_rate(next(iter(cells.values()))) else 1.0
        bars = [
            Bar(target, scale * cell["value"], *(scale * end for end in cell.get("ci", (math.nan,) * 2)))
            for target, cell in cells.items()
        ]
        arrow = "↑" if record.get("higher_is_better") else "↓"
        unit = " (%)" if scale == 100.0 else ""
        charts.append(
            bar_chart(
                f"{name}: {record.get('metric', '')} {arrow}",
                bars,
                f"{record.get('metric', '')}{unit}",
                (0.0, 100.0) if scale == 100.0 else None,
            )
        )
    return charts


def tradeoff_plot(results: Mapping[str, Mapping[str, Any]]) -> str:
    """Each target's mean harmful refusal against its capability measure."""
    points, label = [], "capability"
    for target, cells in results.items():
        label, capability = capability_score(dict(cells))
        points.append(Point(target, capability, 100 * mean_of_kinds(cells, HARMFUL_KINDS)))
    return scatter_chart(
        "safety vs capability", points, label, "mean harmful refusal (%) ↑", y_range=(-5.0, 105.0)
    )


def _answers(directory: Path, benchmark: str) -> dict[str, dict[str, str]]:
    """{target: {prompt: answer}} from the evaluation's saved completions of ``benchmark``."""
    root = directory / "completions"
    found = {}
    for target_dir in sorted(root.iterdir()) if root.is_dir() else []:
        records = load_lines(target_dir / f"{benchmark}.jsonl")
        if records:
            found[target_dir.name] = {
                str(record.get("prompt", "")): str(record.get("response", "")) for record in records
            }
    return found


def _answer_card(target: str, answer: str | None) -> Markup:
    if answer is None:
        return tag("div", tag("b", target), tag("pre", "(no answer saved)"), class_="answer")
    refused = is_refusal(answer)
    verdict = tag(
        "span", "refused" if refused else "answered", class_=f"verdict {'refused' if refused else 'answered'}"
    )
    return tag("div", verdict, tag("b", target), tag("pre", answer), class_="answer")


def answers_browser(
    directory: Path,
    results: Mapping[str, Mapping[str, Any]],
    benchmarks: Mapping[str, Any],
    per_benchmark: int,
) -> Markup:
    """For the first ``per_benchmark`` prompts of each judged benchmark, every target's answer side by
    side with the keyword judge's verdict."""
    order = list(results)
    blocks = []
    for name, record in benchmarks.items():
        if record.get("kind") not in ANSWERED_KINDS:
            continue
        answers = _answers(directory, name)
        if not answers:
            continue
        targets = sorted(answers, key=lambda target: order.index(target) if target in order else len(order))
        prompts = list(dict.fromkeys(prompt for target in targets for prompt in answers[target]))[
            :per_benchmark
        ]
        cards = [
            join(
                [
                    tag("div", prompt, class_="prompt"),
                    tag(
                        "div",
                        *(_answer_card(target, answers[target].get(prompt)) for target in targets),
                        class_="answers",
                    ),
                ]
            )
            for prompt in prompts
        ]
        blocks.append(
            tag(
                "details",
                tag("summary", f"{name} ({record.get('kind')}): {len(prompts)} prompts"),
                *cards,
                open="",
            )
        )
    if not blocks:
        return note("No saved answers (completions/) in this evaluation.")
    return join(
        [
            note(
                "Greedy answers as saved in completions/; the verdict is the keyword judge's "
                "(safesteer.keyword_judge: refusal phrases in the first 200 characters)."
            ),
            *blocks,
        ]
    )


def eval_sections(
    directory: Path, prefix: str = "eval", level: int = 2, per_benchmark: int = 4
) -> list[Section]:
    """The evaluation's sections, their anchors starting with ``prefix``."""
    summary = load(directory / RESULTS_FILE) or {}
    results, benchmarks = summary.get("results") or {}, summary.get("benchmarks") or {}
    if not results:
        return [
            (
                prefix,
                "Evaluation",
                section(prefix, "Evaluation", note(f"{directory}: no results yet."), level=level),
            )
        ]
    settings = summary.get("settings") or {}
    about = (
        f"{directory.name}: model {settings.get('model', '?')}, judge: {summary.get('judge', '?')}; "
        f"seconds per target: "
        + ", ".join(f"{name} {seconds:.0f}" for name, seconds in (summary.get("seconds") or {}).items())
    )
    categories = category_table(results)
    parts: list[tuple[str, str, Sequence[Markup]]] = [
        (
            "results",
            "Evaluation results",
            [
                note(about),
                results_table(results, benchmarks),
                note("Values with their 95 % interval; rates in %, NLL and KL in nats per token."),
            ],
        ),
        ("summary", "Worst cases per target", [summary_table(summary.get("summary") or {})]),
        (
            "categories",
            "Refusal per category",
            [categories if categories is not None else note("No benchmark here records categories.")],
        ),
        (
            "plots",
            "Plots",
            [
                figures(
                    [*bar_plots(results, benchmarks), tradeoff_plot(results)],
                    "Bars: 95 % intervals as whiskers. Trade-off: mean refusal over the "
                    "safety and jailbreak benchmarks against capability.",
                )
            ],
        ),
        ("answers", "Answers side by side", [answers_browser(directory, results, benchmarks, per_benchmark)]),
    ]
    return [
        (f"{prefix}-{anchor}", title, section(f"{prefix}-{anchor}", title, *body, level=level))
        for anchor, title, body in parts
    ]
