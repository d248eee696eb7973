"""Figures of an evaluation (per-benchmark bars, safety versus capability) and of a comparison of
methods (the Pareto plot).

Each is drawn from a saved file alone (``results.json``, ``compare.json``), so it can be redrawn
without rerunning anything.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display

import matplotlib.pyplot as plt

from safesteer.io import atomic_write

HARMFUL_KINDS = ("safety", "jailbreak")


def mean_of_kinds(results: Mapping[str, Mapping[str, Any]], kinds: Sequence[str]) -> float:
    """Mean value over the target's benchmarks of these kinds (NaN without any). A benchmark left
    empty (NaN: every prompt was a near-duplicate of a training prompt) has no rate to average."""
    values = [row["value"] for row in results.values()
              if row["kind"] in kinds and not math.isnan(row["value"])]
    return sum(values) / len(values) if values else math.nan


Results = Mapping[str, Mapping[str, Any]]  # one target's results.json cells, by benchmark


def worst_of_kinds(results: Results, kinds: Sequence[str]) -> tuple[float, str | None]:
    """The target's worst value over its benchmarks of these kinds and where it occurs: the lowest
    for a higher-is-better metric (harmful refusal), else the highest (over-refusal). A mean would
    hide a benign set that the model refuses wholesale behind easy ones. (NaN, None) without any."""
    rows = {name: row for name, row in results.items()
            if row["kind"] in kinds and not math.isnan(row["value"])}
    if not rows:
        return math.nan, None
    name = (min if next(iter(rows.values()))["higher_is_better"] else max)(
        rows, key=lambda key: rows[key]["value"])
    return rows[name]["value"], name


def pooled_styles(results: Results, kinds: Sequence[str]) -> dict[str, dict[str, float]]:
    """Refusal per request style ("question", "instruction") pooled over the benchmarks of these
    kinds, weighted by prompts: ``{style: {"n": count, "value": rate}}``."""
    counts: dict[str, list[float]] = {}
    for row in results.values():
        if row["kind"] not in kinds:
            continue
        for style, cell in row.get("styles", {}).items():
            total = counts.setdefault(style, [0.0, 0.0])
            total[0] += cell["n"]
            total[1] += cell["n"] * cell["value"]
    return {style: {"n": n, "value": refused / n} for style, (n, refused) in sorted(counts.items()) if n}


def capability_score(results: dict[str, Any]) -> tuple[str, float]:
    """The capability axis: MMLU(-STEM) accuracy when measured, else the first capability measure."""
    for name in ("mmlu-stem", "mmlu"):
        if name in results:
            return f"{name} accuracy", results[name]["value"]
    for name, row in results.items():
        if row["kind"] == "capability":
            return f"{name} {row['metric']}", row["value"]
    return "no capability measure", math.nan


def _error(length: float) -> float:
    """An error-bar length; 0 where the interval is undefined (NaN)."""
    return 0.0 if math.isnan(length) else max(0.0, length)


def plot_results(summary: dict[str, Any], output_dir: str | Path) -> list[Path]:
    """Write ``bars.png`` (one panel per benchmark, a bar per target with its 95 % interval) and
    ``tradeoff.png`` (one point per target: safety against capability); returns the paths."""
    output_dir = Path(output_dir)
    results: dict[str, dict[str, Any]] = summary["results"]
    targets = list(results)
    benchmarks = list(next(iter(results.values()))) if results else []
    columns = min(4, max(1, len(benchmarks)))
    rows = math.ceil(len(benchmarks) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.6 * rows), squeeze=False)
    for axis, name in zip(axes.flat, benchmarks, strict=False):
        cells = [results[target][name] for target in targets]
        values = [cell["value"] for cell in cells]
        errors = [[_error(cell["value"] - cell["ci"][0]) for cell in cells],
                  [_error(cell["ci"][1] - cell["value"]) for cell in cells]]
        axis.bar(targets, values, yerr=errors, capsize=3, color=[f"C{i}" for i in range(len(targets))])
        row = results[targets[0]][name]
        axis.set_title(f"{name}\n{row['metric']} {'↑' if row['higher_is_better'] else '↓'}", fontsize=8)
        axis.tick_params(labelsize=7)
    for axis in list(axes.flat)[len(benchmarks):]:
        axis.set_visible(False)
    figure.tight_layout()
    bars = output_dir / "bars.png"
    figure.savefig(bars, dpi=120)
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(4.5, 3.6))
    label = "capability"
    for index, target in enumerate(targets):
        label, capability = capability_score(results[target])
        safety = mean_of_kinds(results[target], HARMFUL_KINDS)
        axis.scatter([capability], [safety], color=f"C{index}", s=40)
        axis.annotate(target, (capability, safety), textcoords="offset points", xytext=(4, 4), fontsize=8)
    axis.set_xlabel(label)
    axis.set_ylabel("mean refusal on harmful benchmarks")
    axis.set_title("safety vs capability", fontsize=9)
    figure.tight_layout()
    tradeoff = output_dir / "tradeoff.png"
    figure.savefig(tradeoff, dpi=120)
    plt.close(figure)
    return [bars, tradeoff]


SAFETY_AXES = {"harmful_refusal": "mean harmful refusal (%) ↑",
               "robust_refusal": "mean refusal under attack (%) ↑"}


def plot_pareto(rows: Sequence[Mapping[str, Any]], path: str | Path, safety: str = "harmful_refusal") -> Path:
    """Write one point per method (the rows of ``compare.json``): capability drift (%) across,
    ``safety`` (mean harmful refusal, or mean refusal under the robustness attacks) up, worst
    over-refusal as the colour; the methods no other method dominates on drift, harmful refusal
    and over-refusal (``dominated_by`` empty) are ringed. Rows lacking a value are listed in the
    title instead."""
    path = Path(path)
    axes = ("capability_drift", safety, "over_refusal")
    shown = [row for row in rows if all(math.isfinite(row[axis]) for axis in axes)]
    missing = [row["method"] for row in rows if row not in shown]
    figure, axis = plt.subplots(figsize=(6.4, 4.8))
    if shown:
        drift = [row["capability_drift"] for row in shown]
        refusal = [100 * row[safety] for row in shown]
        over_refusal = [100 * row["over_refusal"] for row in shown]
        points = axis.scatter(drift, refusal, c=over_refusal, cmap="viridis", vmin=0,
                              vmax=max(*over_refusal, 1.0), s=60, zorder=3)
        figure.colorbar(points, ax=axis, label="over-refusal, worst benign set (%) ↓")
        front = [index for index, row in enumerate(shown) if not row["dominated_by"]]
        axis.scatter([drift[i] for i in front], [refusal[i] for i in front], s=240, facecolors="none",
                     edgecolors="crimson", linewidths=1.5, zorder=4)
        # Methods that land close together share one label, their names on one line.
        span = (max(drift) - min(drift)) or 1.0
        clusters: list[list[int]] = []
        for index in sorted(range(len(shown)), key=lambda i: (refusal[i], drift[i])):
            near = next((cluster for cluster in clusters if abs(refusal[cluster[0]] - refusal[index]) < 4
                         and abs(drift[cluster[0]] - drift[index]) < 0.03 * span), None)
            if near is None:
                clusters.append([index])
            else:
                near.append(index)
        middle = (max(drift) + min(drift)) / 2
        for cluster in clusters:
            x = max(drift[i] for i in cluster)
            left = x > middle  # labels on the right half go leftwards, inside the axes
            axis.annotate(", ".join(shown[i]["method"] for i in cluster), (x, refusal[cluster[0]]),
                          textcoords="offset points", xytext=(-8 if left else 8, -3),
                          ha="right" if left else "left", fontsize=7)
    axis.axvline(0.0, color="grey", linewidth=0.6, linestyle=":")
    axis.set_ylim(-5, 105)
    axis.set_xlabel("capability drift: gold-answer NLL vs base (%) ↓")
    axis.set_ylabel(SAFETY_AXES[safety])
    title = "safety vs capability drift; ringed: the Pareto front (on all three axes)"
    if missing:
        title += "\nnot shown (a value is missing): " + ", ".join(missing)
    axis.set_title(title, fontsize=9)
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=130))
    plt.close(figure)
    return path
