"""One report page for a run, evaluation or comparison directory, written atomically."""

from __future__ import annotations

from pathlib import Path

from safesteer import __version__
from safesteer.errors import SafesteerError
from safesteer.htmlreport.compare_view import compare_sections
from safesteer.htmlreport.eval_view import eval_sections
from safesteer.htmlreport.page import document
from safesteer.htmlreport.run_view import Section, run_sections
from safesteer.htmlreport.sources import REPORT_FILE, detect
from safesteer.io import atomic_write

TITLES = {"run": "safesteer run", "eval": "safesteer eval", "compare": "safesteer compare"}


def report_sections(directory: Path) -> tuple[str, list[Section]]:
    """The directory's kind and its sections, in reading order; a run's evaluations follow it."""
    inputs = detect(directory)
    if inputs.kind == "compare":
        return inputs.kind, compare_sections(directory)
    if inputs.kind == "eval":
        return inputs.kind, eval_sections(directory)
    sections = run_sections(directory)
    for evaluation in inputs.evals:
        prefix = "eval" if len(inputs.evals) == 1 else f"eval-{evaluation.name}"
        sections += eval_sections(evaluation, prefix)
    return inputs.kind, sections


def build_report(directory: Path) -> str:
    """The report page's HTML."""
    kind, sections = report_sections(directory)
    return document(
        f"{TITLES[kind]}: {directory.resolve().name}",
        f"Report on {directory} ({kind} directory), safesteer {__version__}.",
        [(anchor, title) for anchor, title, _ in sections],
        [body for _, _, body in sections],
    )


def default_output(directory: Path) -> Path:
    return directory / REPORT_FILE


def write_report(directory: Path, output: Path | None = None) -> Path:
    """Write the page to ``output`` (default: ``report.html`` in the directory), whole or not at all."""
    output = output or default_output(directory)
    if output.is_dir():
        raise SafesteerError(f"--output {output} is a directory; give a file name such as report.html")
    text = build_report(directory)
    try:
        atomic_write(output, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    except OSError as error:
        raise SafesteerError(f"--output {output}: cannot write it ({error.strerror or error})") from error
    return output
