"""`make test-oldest` tests the lower bounds pyproject.toml declares only while its pins are those
bounds (DEVELOPERS.md)."""

import re
import tomllib
from pathlib import Path

from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def test_the_oldest_pins_are_the_declared_lower_bounds() -> None:
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    floors = {name: Version(floor) for name, floor in
              (re.fullmatch(r"([\w-]+)>=([\w.]+)", requirement).groups() for requirement in declared)}
    floors.pop("torch")  # the pinned CPU build (TORCH_SPEC), the only one on the project's machines
    lines = (ROOT / ".ci" / "oldest.txt").read_text().splitlines()
    pins = {name: Version(pin) for name, pin in (line.split("==") for line in lines
                                                 if line and not line.startswith("#"))}
    assert pins == floors  # Version("6") == Version("6.0")
