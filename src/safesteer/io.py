"""Atomic artifact writes and run-directory guards, so an interrupted run never leaves half a file."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from safesteer.errors import SafesteerError


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary sibling of ``path``, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, payload: Any) -> None:
    text = json.dumps(payload, indent=2, ensure_ascii=False) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def read_json(path: Path) -> Any:
    """The file's JSON; a malformed file is a one-line error naming the file and line."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise SafesteerError(f"{path}: line {error.lineno}: invalid JSON") from error


def guard_output_dir(output_dir: Path, artifacts: Iterable[str], overwrite: bool) -> Path:
    """Refuse to clobber ``artifacts`` already in ``output_dir``; checked before any work starts.

    The directory itself is created only when the first artifact is written, so a run that fails
    early leaves nothing behind.
    """
    existing = [name for name in artifacts if (output_dir / name).exists()]
    if existing and not overwrite:
        raise SafesteerError(
            f"{output_dir} already holds {', '.join(existing)}; pass --overwrite to replace them "
            "or choose another --output-dir"
        )
    return output_dir


def differing_settings(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key (saved -> current)`` for each setting of ``current`` that ``saved`` records otherwise;
    what a resume must refuse on. Keys only in ``saved`` (derived records) are not compared."""
    return [f"{key} ({saved.get(key)!r} -> {value!r})"
            for key, value in sorted(current.items()) if saved.get(key) != value]
