"""An evaluation's summary: ``results.json``, ``results.md`` and the plots, written by one
``safesteer eval`` or merged from several evaluations of a few targets each (``safesteer compare``
evaluates every target in a process of its own, beside the trainings)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from safesteer.evaluate.benchmarks import lookup
from safesteer.evaluate.tables import (
    category_table,
    results_table,
    robustness_table,
    summary_table,
    target_summary,
)
from safesteer.io import write_json
from safesteer.report import plot_results

RESULTS_FILE = "results.json"
JUDGE = "keyword (safesteer.keyword_judge: first 200 characters), greedy decoding"


def build_summary(results: Mapping[str, dict[str, Any]], seconds: Mapping[str, float],
                  memory: Mapping[str, Mapping[str, float | None]], benchmarks: Sequence[str],
                  settings: Mapping[str, Any], software: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """``results.json``'s content: every target's cells, its summary, its seconds, the peak memory
    of the process that evaluated it (up to the end of that target) and that process's software
    (:func:`~safesteer.software.software`; saved answers it reused may have been made under
    another)."""
    return {"results": dict(results), "benchmarks": {name: lookup(name).record() for name in benchmarks},
            "summary": {name: target_summary(result) for name, result in results.items()},
            "judge": JUDGE, "seconds": dict(seconds), "memory": dict(memory), "settings": dict(settings),
            "software": dict(software)}


def merge_summaries(parts: Sequence[Mapping[str, Any]], settings: Mapping[str, Any]) -> dict[str, Any]:
    """One summary of ``parts`` (at least one; summaries of disjoint targets, made with the same
    benchmarks), targets in the parts' order, under ``settings``."""
    def merged(key: str) -> dict[str, Any]:  # parts written before a key existed lack it
        return {name: value for part in parts for name, value in part.get(key, {}).items()}
    return build_summary(merged("results"), merged("seconds"), merged("memory"), list(parts[0]["benchmarks"]),
                         settings, merged("software"))


def write_summary(summary: Mapping[str, Any], output_dir: str | Path) -> None:
    """Write ``results.json``, ``results.md`` and the plots into ``output_dir``; print the tables."""
    output_dir = Path(output_dir)
    results = summary["results"]
    write_json(output_dir / RESULTS_FILE, summary)
    table = results_table(results, list(summary["benchmarks"])) + "\n\n" + summary_table(summary["summary"])
    sections = [table, robustness_table(results), category_table(results)]
    (output_dir / "results.md").write_text("\n\n".join(filter(None, sections)) + "\n", encoding="utf-8")
    plot_results(dict(summary), output_dir)
    print("\n\n".join(filter(None, sections[:2])))
