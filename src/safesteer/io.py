"""Atomic artifact writes and output-directory guards.

Atomic writes mean an interrupted run never leaves half a file. The guards mean a command never
deletes, or mixes its files into, a directory it did not make: every output directory records its
kind in a small manifest (``safesteer.json``), and ``--overwrite`` / ``--resume`` act only on a
directory of the command's own kind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safesteer import __version__
from safesteer.errors import SafesteerError


def _file_mode() -> int:
    """The mode ``open`` gives a new file (0644 under the usual umask 022); ``mkstemp`` gives 0600."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary sibling of ``path``, then rename it into place, readable
    as any other file the user creates (like the model files beside it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def settle_file_modes(directory: Path) -> None:
    """Give every file under ``directory`` the mode of any new file (0644 under umask 022), before
    it is published: libraries that save through temporary files (safetensors weights from
    transformers 5 and peft) leave theirs 0600, unreadable to the user's group beside readable
    configs."""
    mode = _file_mode()
    for path in directory.rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.chmod(path, mode)


def write_json(path: Path, payload: Any) -> None:
    text = json.dumps(payload, indent=2, ensure_ascii=False) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def read_json(path: Path) -> Any:
    """The file's JSON; a malformed file is a one-line error naming the file and line."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise SafesteerError(f"{path}: line {error.lineno}: invalid JSON") from error


def guard_output_dir(output_dir: Path, artifacts: Iterable[str], overwrite: bool,
                     derived: Iterable[str] = ()) -> Path:
    """Refuse to clobber ``artifacts`` already in ``output_dir``; checked before any work starts.

    ``derived`` names the artifacts made from these ones: while any exists, even ``overwrite`` is
    refused, since replacing the inputs would leave results of the old ones beside the new. The
    directory itself is created only when the first artifact is written, so a run that fails early
    leaves nothing behind.
    """
    existing = [name for name in artifacts if (output_dir / name).exists()]
    if existing and not overwrite:
        raise SafesteerError(
            f"{output_dir} already holds {', '.join(existing)}; pass --overwrite to replace them "
            "or choose another --output-dir"
        )
    stale = [name for name in derived if (output_dir / name).exists()] if existing else []
    if stale:
        raise SafesteerError(
            f"{output_dir} holds {', '.join(stale)}, made from its {', '.join(existing)}; replacing "
            "them would mix old and new results, so start a new directory or rerun everything with "
            "`safesteer run --overwrite`"
        )
    check_writable(output_dir)
    return output_dir


def check_writable(directory: Path, flag: str = "--output-dir") -> None:
    """Refuse a directory that cannot be created or written, found by trying: a folder is made and
    removed at once in ``directory`` or its nearest existing parent. Run before any work, so an
    impossible path (under ``/proc``, under a file, read-only) fails in a second, not after hours."""
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise SafesteerError(f"cannot create {directory}: {existing} is a file, not a directory; "
                             f"choose another {flag}")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".safesteer-probe-", dir=existing))
    except OSError as error:
        what = "write to" if existing == directory else "create"
        raise SafesteerError(f"cannot {what} {directory}: {existing} is not writable ({error.strerror}); "
                             f"choose another {flag}") from error


def differing_settings(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key (saved -> current)`` for each setting of ``current`` that ``saved`` records otherwise;
    what a resume must refuse on. Keys only in ``saved`` (derived records) are not compared."""
    return [f"{key} ({saved.get(key)!r} -> {value!r})"
            for key, value in sorted(current.items()) if saved.get(key) != value]


# ------------------------------------------------------------------------- output directories

MANIFEST_FILE = "safesteer.json"
_TRASH_DIR = ".safesteer-replaced"  # an overwrite's old contents, between the move aside and the delete


@dataclass(frozen=True)
class OutputKind:
    """A kind of directory safesteer writes, recorded in its manifest.

    ``markers`` are artifacts that identify a directory of this kind written before manifests
    existed, so older runs still resume and overwrite; a kind without markers (an export, which is
    just a model directory like any other) is recognised by its manifest only. ``hint`` says how to
    go on when a fresh write meets an existing one; a ``reused`` kind (an evaluation, which keeps
    its saved answers) is simply continued.
    """

    name: str
    markers: tuple[str, ...] = ()
    hint: str = "pass --overwrite to replace it or choose another --output-dir"
    reused: bool = False


RUN_KIND = OutputKind("run", ("direction.json", "safety_tokens.json", "distill_config.json", "check.json"),
                      "continue it with `safesteer run --resume` or pass --overwrite to start afresh")
EXPORT_KIND = OutputKind("export")
EVAL_KIND = OutputKind("eval", ("results.json", "completions"), reused=True)


def recorded_kind(directory: Path) -> str | None:
    """The kind named by ``directory``'s manifest; None without one."""
    path = directory / MANIFEST_FILE
    if not path.is_file():
        return None
    record = read_json(path)
    return str(record.get("kind")) if isinstance(record, dict) else ""


def _contents(directory: Path) -> list[str]:
    """What ``directory`` holds besides the manifest and an interrupted overwrite's leftovers."""
    if not directory.is_dir():
        return []
    return sorted(entry.name for entry in directory.iterdir()
                  if entry.name not in (MANIFEST_FILE, _TRASH_DIR))


def _a(noun: str) -> str:
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


def _listing(names: list[str], limit: int = 3) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_output_dir(directory: Path, kind: OutputKind, *, overwrite: bool = False,
                     resume: bool = False) -> Path:
    """Refuse an output directory the command must not write into; changes nothing, so every
    process of a distributed run can call it before the main one writes.

    Accepted: a missing or empty directory (not with ``resume``: a mistyped path must not silently
    start afresh) and one of ``kind`` (by manifest, else by marker) when ``overwrite``, ``resume``
    or ``kind.reused`` allows. Refused: a file, another kind's directory, and anything else that
    is not empty (it may be the user's own folder or a parent of several runs).
    """
    if directory.exists() and not directory.is_dir():
        raise SafesteerError(f"{directory} is a file, not a directory; choose another --output-dir")
    recorded = recorded_kind(directory)
    action = "replace" if overwrite else "resume from" if resume else "write into"
    if recorded not in (None, kind.name):
        raise SafesteerError(f"refusing to {action} {directory}: it is a safesteer {recorded or 'unknown'} "
                             f"directory, not {_a(kind.name)} directory; choose another --output-dir")
    contents = _contents(directory)
    if not contents and recorded is None:
        if resume:
            state = "is empty" if directory.exists() else "does not exist"
            raise SafesteerError(f"cannot resume: {directory} {state}, so there is no {kind.name} to "
                                 "continue; check the path, or drop --resume to start a new one there")
        check_writable(directory)
        return directory
    if recorded is None and not any((directory / name).exists() for name in kind.markers):
        raise SafesteerError(f"refusing to {action} {directory}: it holds files that are not a safesteer "
                             f"{kind.name} ({_listing(contents)}); choose a new or empty --output-dir")
    if contents and not (overwrite or resume or kind.reused):
        raise SafesteerError(f"{directory} already holds {_a(kind.name)} ({_listing(contents)}); {kind.hint}")
    check_writable(directory)
    return directory


def claim_output_dir(directory: Path, kind: OutputKind, *, overwrite: bool = False) -> Path:
    """Create ``directory`` as ``kind``'s output, recording the manifest; with ``overwrite`` its old
    contents go first, so new artifacts never appear beside old ones. Call it after
    :func:`check_output_dir` (on the main process only) and just before the first artifact is
    written, so a run that fails while loading leaves nothing behind."""
    if overwrite:
        clear_output_dir(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if recorded_kind(directory) is None:
        write_json(directory / MANIFEST_FILE, {"kind": kind.name, "version": __version__})
    return directory


def clear_output_dir(directory: Path, names: Iterable[str] | None = None) -> None:
    """Delete ``directory``'s contents (only ``names``, when given), keeping its manifest.

    Everything is first renamed into one hidden folder inside ``directory`` (a rename per entry,
    instantaneous) and only then deleted, so a kill during a long delete leaves no old artifact
    where a new run would pick it up; the next clear finishes the delete. Symbolic links are removed,
    never followed.
    """
    if not directory.is_dir():
        return
    trash = directory / _TRASH_DIR
    if trash.exists():  # an interrupted clear's
        shutil.rmtree(trash)
    entries = directory.iterdir() if names is None else (directory / name for name in names)
    moving = [entry for entry in entries if entry.name not in (MANIFEST_FILE, _TRASH_DIR)
              and (entry.exists() or entry.is_symlink())]
    if not moving:
        return
    trash.mkdir()
    for entry in moving:
        os.replace(entry, trash / entry.name)
    shutil.rmtree(trash)


def publish_dir(staging: Path, final: Path, kind: OutputKind) -> Path:
    """Rename the fully written ``staging`` to ``final``; an existing ``final`` is replaced only when
    it is ``kind``'s output (checked here, where the delete happens, whatever the caller checked)
    and is first renamed aside, so ``final`` is always either the old or the new directory."""
    check_output_dir(final, kind, overwrite=True)
    settle_file_modes(staging)
    if not final.exists():
        os.replace(staging, final)
        return final
    old = final.parent / f".{final.name}.replaced"
    shutil.rmtree(old, ignore_errors=True)
    os.replace(final, old)
    os.replace(staging, final)
    shutil.rmtree(old)
    return final


def check_apart(output_dir: Path, source_dir: Path, source_flag: str) -> None:
    """Refuse an ``output_dir`` equal to, inside, or containing ``source_dir``: replacing it would
    delete the source (the run an export is made from) or mix the two."""
    output, source = output_dir.resolve(), source_dir.resolve()
    if output == source or source in output.parents:
        relation = "is" if output == source else "is inside"
        raise SafesteerError(f"refusing to write into {output_dir}: it {relation} the {source_flag} "
                             f"{source_dir}; choose an --output-dir outside it")
    if output in source.parents:
        raise SafesteerError(f"refusing to write into {output_dir}: it contains the {source_flag} "
                             f"{source_dir}, which --overwrite would delete; choose an --output-dir "
                             "outside it")
