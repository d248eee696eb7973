"""Which directory a report is asked for (a run, an evaluation or a comparison) and its files.

A directory is recognised by its manifest (``safesteer.json``) or, for one written before
manifests or by ``safesteer compare`` (which has none), by the files only that command writes.
A run directory's evaluations (``safesteer eval --output-dir RUN/eval-val``) join its report.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safesteer.errors import SafesteerError
from safesteer.io import RUN_KIND, read_json, recorded_kind

logger = logging.getLogger(__name__)

REPORT_FILE = "report.html"
COMPARE_FILE = "compare.json"
RESULTS_FILE = "results.json"
TRAIN_LOG = "train_log.jsonl"


@dataclass(frozen=True)
class Inputs:
    """What one report shows: ``kind`` is the directory's ("run", "eval" or "compare"); a run's
    ``evals`` are the evaluation directories inside it."""

    kind: str
    directory: Path
    evals: list[Path] = field(default_factory=list)


def is_eval_dir(directory: Path) -> bool:
    return recorded_kind(directory) == "eval" or (directory / RESULTS_FILE).is_file()


def is_run_dir(directory: Path) -> bool:
    return recorded_kind(directory) == "run" or any(
        (directory / name).is_file() for name in (*RUN_KIND.markers, TRAIN_LOG)
    )


def detect(directory: Path) -> Inputs:
    """The kind of ``directory``; a one-line error for anything else."""
    if not directory.is_dir():
        raise SafesteerError(
            f"{directory}: no such directory (give the --output-dir of `safesteer run`, `eval` or `compare`)"
        )
    if (directory / COMPARE_FILE).is_file():
        return Inputs("compare", directory)
    if is_eval_dir(directory):
        return Inputs("eval", directory)
    if is_run_dir(directory):
        evals = sorted(child for child in directory.iterdir() if child.is_dir() and is_eval_dir(child))
        return Inputs("run", directory, evals)
    kind = recorded_kind(directory)
    what = f"an {kind} directory" if kind else "not a directory safesteer wrote"
    raise SafesteerError(
        f"{directory}: {what}; nothing to report (give the --output-dir of "
        "`safesteer run`, `eval` or `compare`)"
    )


def load(path: Path) -> Any:
    """A JSON artifact, or None when the directory has none (a stage that did not run)."""
    return read_json(path) if path.is_file() else None


def load_lines(path: Path) -> list[dict[str, Any]]:
    """A JSONL file's records; a line cut short by an interrupted write is skipped with a warning."""
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            logger.warning("%s: line %d is not JSON; left out of the report", path, number)
            continue
        if isinstance(record, dict):
            records.append(record)
    return records
