"""``safesteer report``: its options and handler, apart from the page code so that ``--help``
imports nothing but this."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from safesteer.htmlreport.sources import REPORT_FILE
from safesteer.validation import check_not_empty


@dataclass
class ReportArguments:
    """The directory to report on and where the page goes."""

    directory: str = field(
        metadata={
            "help": "A `safesteer run`, `eval` or `compare` output directory (a run's evaluations inside "
            "it join its report).",
            "metavar": "DIR",
            "positional": True,
        }
    )
    output: str | None = field(
        default=None,
        metadata={"help": f"The HTML file to write (default: DIR/{REPORT_FILE}).", "metavar": "FILE.html"},
    )

    def __post_init__(self) -> None:
        check_not_empty(self, ("directory", "output"))


def report_hint(directory: Path) -> str:
    """The line ``run`` and ``eval`` end with: how to see their results as a page."""
    return f"report: `safesteer report {directory}` writes {directory / REPORT_FILE}"


def report_command(args: ReportArguments) -> Path:
    from safesteer.htmlreport.build import write_report

    path = write_report(Path(args.directory), Path(args.output) if args.output else None)
    print(f"wrote {path}")
    return path
