"""Figures of an evaluation: per-benchmark bars and the safety-versus-capability trade-off.

Both are drawn from ``results.json`` alone, so they can be redrawn without rerunning anything.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display

import matplotlib.pyplot as plt

HARMFUL_KINDS = ("safety", "jailbreak")


def safety_score(results: dict[str, Any]) -> float:
    """Mean refusal rate over the target's safety and jailbreak benchmarks (NaN without any)."""
    rates = [row["value"] for row in results.values() if row["kind"] in HARMFUL_KINDS]
    return sum(rates) / len(rates) if rates else math.nan


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
        safety = safety_score(results[target])
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
