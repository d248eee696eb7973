"""Output-directory guards: what --overwrite and --resume may replace, and how an overwrite clears."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from safesteer import __version__
from safesteer.errors import SafesteerError
from safesteer.io import (
    EVAL_KIND,
    EXPORT_KIND,
    MANIFEST_FILE,
    RUN_KIND,
    check_apart,
    check_output_dir,
    check_writable,
    claim_output_dir,
    clear_output_dir,
    publish_dir,
    settle_file_modes,
    write_json,
)


def snapshot(root: Path) -> list[tuple[str, bytes | None]] | None:
    """Every path under ``root`` with its bytes (None for a directory); None when root is missing."""
    if not root.exists():
        return None
    return sorted((str(path.relative_to(root)), None if path.is_dir() else path.read_bytes())
                  for path in root.rglob("*"))


def make_legacy_run(path: Path) -> Path:
    """A run directory as versions without the manifest wrote it."""
    (path / "student").mkdir(parents=True)
    (path / "student" / "adapter_model.safetensors").write_bytes(b"weights")
    (path / "checkpoints" / "step-2").mkdir(parents=True)
    for name in ("direction.json", "safety_tokens.json", "distill_config.json", "check.json"):
        (path / name).write_text("{}")
    return path


def make_unrelated(path: Path) -> Path:
    (path / "photos").mkdir(parents=True)
    (path / "photos" / "cat.jpg").write_bytes(b"jpeg")
    (path / "notes.txt").write_text("mine")
    return path


@pytest.mark.parametrize("overwrite", [False, True])
def test_missing_or_empty_directory_is_accepted_unless_resuming(tmp_path, overwrite) -> None:
    (tmp_path / "empty").mkdir()
    for path in (tmp_path / "missing", tmp_path / "empty"):
        assert check_output_dir(path, RUN_KIND, overwrite=overwrite) == path
    assert not (tmp_path / "missing").exists()


@pytest.mark.parametrize(("name", "state"), [("missing", "does not exist"), ("empty", "is empty")])
def test_resume_without_a_run_is_an_error(tmp_path, name, state) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(SafesteerError, match=f"cannot resume: .*{name} {state}, so there is no run"):
        check_output_dir(tmp_path / name, RUN_KIND, resume=True)
    assert not (tmp_path / "missing").exists() and not any((tmp_path / "empty").iterdir())


def test_resume_accepts_a_run_that_stopped_before_its_first_artifact(tmp_path) -> None:
    run = claim_output_dir(tmp_path / "run", RUN_KIND)
    assert json.loads((run / MANIFEST_FILE).read_text())["kind"] == "run"
    assert check_output_dir(run, RUN_KIND, resume=True) == run
    assert check_output_dir(run, RUN_KIND) == run  # nothing to clobber: a fresh start may use it too


@pytest.mark.parametrize(("overwrite", "resume", "action"), [
    (False, False, "write into"), (True, False, "replace"), (False, True, "resume from")])
def test_an_unrelated_folder_is_never_used(tmp_path, overwrite, resume, action) -> None:
    folder = make_unrelated(tmp_path / "mine")
    before = snapshot(folder)
    with pytest.raises(SafesteerError, match=f"refusing to {action} .*mine: it holds files that are not a "
                                             r"safesteer run \(notes.txt, photos\)"):
        check_output_dir(folder, RUN_KIND, overwrite=overwrite, resume=resume)
    assert snapshot(folder) == before


def test_a_parent_of_runs_is_not_a_run(tmp_path) -> None:
    make_legacy_run(tmp_path / "runs" / "a")
    claim_output_dir(tmp_path / "runs" / "b", RUN_KIND)
    with pytest.raises(SafesteerError, match=r"not a safesteer run \(a, b\)"):
        check_output_dir(tmp_path / "runs", RUN_KIND, overwrite=True)


def test_another_kind_is_refused(tmp_path) -> None:
    run = claim_output_dir(tmp_path / "run", RUN_KIND)
    (run / "direction.json").write_text("{}")
    with pytest.raises(SafesteerError, match="it is a safesteer run directory, not an export directory"):
        check_output_dir(run, EXPORT_KIND, overwrite=True)
    with pytest.raises(SafesteerError, match="not an eval directory"):
        check_output_dir(run, EVAL_KIND)
    (tmp_path / "file").write_text("x")
    with pytest.raises(SafesteerError, match="is a file, not a directory"):
        check_output_dir(tmp_path / "file", RUN_KIND, overwrite=True)


def test_a_run_of_an_older_version_is_recognised_by_its_artifacts(tmp_path) -> None:
    run = make_legacy_run(tmp_path / "run")
    with pytest.raises(SafesteerError, match=r"already holds a run \(check.json, checkpoints, "
                                             r"direction.json and 3 more\); continue it with "
                                             r"`safesteer run --resume` or pass --overwrite"):
        check_output_dir(run, RUN_KIND)
    assert check_output_dir(run, RUN_KIND, resume=True) == run
    assert check_output_dir(run, RUN_KIND, overwrite=True) == run


def test_an_export_is_recognised_by_its_manifest_only(tmp_path) -> None:
    """A plain model directory without the manifest may be the user's own model: never replaced."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"weights")
    with pytest.raises(SafesteerError, match="not a safesteer export"):
        check_output_dir(model, EXPORT_KIND, overwrite=True)
    (model / MANIFEST_FILE).write_text('{"kind": "export", "version": "0.1.0"}')
    with pytest.raises(SafesteerError, match=r"already holds an export .* pass --overwrite"):
        check_output_dir(model, EXPORT_KIND)
    assert check_output_dir(model, EXPORT_KIND, overwrite=True) == model


def test_an_evaluation_is_continued_without_a_flag(tmp_path) -> None:
    out = claim_output_dir(tmp_path / "eval", EVAL_KIND)
    (out / "results.json").write_text("{}")
    assert check_output_dir(out, EVAL_KIND) == out
    (out / MANIFEST_FILE).unlink()  # an evaluation of an older version
    assert check_output_dir(out, EVAL_KIND) == out


def test_overwrite_clears_the_previous_run_before_anything_new_is_written(tmp_path) -> None:
    run = make_legacy_run(tmp_path / "run")
    (run / ".student.tmp").mkdir()  # an interrupted save's staging
    claim_output_dir(run, RUN_KIND, overwrite=True)
    assert [path.name for path in run.iterdir()] == [MANIFEST_FILE]
    assert json.loads((run / MANIFEST_FILE).read_text()) == {"kind": "run", "version": __version__}


def test_an_interrupted_clear_leaves_no_old_artifact_in_view(tmp_path, monkeypatch) -> None:
    """Everything is renamed aside first; a kill during the (slow) delete leaves only the hidden
    folder, which the next clear removes."""
    run = claim_output_dir(make_legacy_run(tmp_path / "run"), RUN_KIND)

    def killed(path, *args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(shutil, "rmtree", killed)
        clear_output_dir(run)
    assert sorted(path.name for path in run.iterdir()) == [".safesteer-replaced", MANIFEST_FILE]
    assert check_output_dir(run, RUN_KIND) == run  # nothing left to clobber or to mix with
    claim_output_dir(run, RUN_KIND, overwrite=True)
    assert [path.name for path in run.iterdir()] == [MANIFEST_FILE]


def test_clear_removes_only_the_named_entries_and_never_follows_links(tmp_path) -> None:
    mine = make_unrelated(tmp_path / "mine")
    before = snapshot(mine)
    run = make_legacy_run(tmp_path / "run")
    (run / "data").symlink_to(mine, target_is_directory=True)
    clear_output_dir(run, ("student", "checkpoints", "train_log.jsonl"))
    assert sorted(path.name for path in run.iterdir()) == [
        "check.json", "data", "direction.json", "distill_config.json", "safety_tokens.json"]
    clear_output_dir(run)
    assert list(run.iterdir()) == [] and snapshot(mine) == before


def test_publish_replaces_an_earlier_export_and_nothing_else(tmp_path) -> None:
    def staged(content: str) -> Path:
        staging = tmp_path / ".out.tmp"
        staging.mkdir()
        (staging / "model.safetensors").write_text(content)
        return claim_output_dir(staging, EXPORT_KIND)

    out = tmp_path / "out"
    publish_dir(staged("first"), out, EXPORT_KIND)
    publish_dir(staged("second"), out, EXPORT_KIND)
    assert (out / "model.safetensors").read_text() == "second"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]  # no staging or old copy left
    mine = make_unrelated(tmp_path / "mine")
    before = snapshot(mine)
    with pytest.raises(SafesteerError, match="not a safesteer export"):
        publish_dir(staged("third"), mine, EXPORT_KIND)
    assert snapshot(mine) == before


@pytest.mark.parametrize(("output", "message"), [
    ("run", "it is the --run-dir"), ("run/merged", "it is inside the --run-dir"),
    ("run/./merged/../", "it is the --run-dir"), ("alias/merged", "it is inside the --run-dir"),
    (".", "it contains the --run-dir"), ("", "it contains the --run-dir")])
def test_an_output_overlapping_the_source_is_refused(tmp_path, monkeypatch, output, message) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "run", target_is_directory=True)
    output_dir = Path(output) if output else tmp_path
    with pytest.raises(SafesteerError, match=f"refusing to write into .*: {message} run[;,] .*choose an "
                                             "--output-dir outside it"):
        check_apart(output_dir, Path("run"), "--run-dir")
    check_apart(Path("run-merged"), Path("run"), "--run-dir")


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_json_artifacts_get_the_mode_of_any_new_file(tmp_path: Path, umask: int) -> None:
    previous = os.umask(umask)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
        (tmp_path / "plain.bin").write_bytes(b"")
    finally:
        os.umask(previous)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == (tmp_path / "plain.bin").stat().st_mode & 0o777
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o666 & ~umask


def test_an_impossible_output_directory_is_found_by_trying_and_nothing_is_left(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(SafesteerError, match=r"file is a file, not a directory; choose another --output-dir"):
        check_writable(tmp_path / "file" / "run")
    with pytest.raises(SafesteerError, match=r"cannot create /proc/safesteer-x/run: /proc is not writable"):
        check_writable(Path("/proc/safesteer-x/run"))
    check_writable(tmp_path / "new" / "run")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["file"]


def test_published_directories_hold_files_of_the_usual_mode(tmp_path: Path) -> None:
    staging = tmp_path / "staging"
    (staging / "sub").mkdir(parents=True)
    for name in ("model.safetensors", "sub/config.json"):
        (staging / name).write_bytes(b"x")
        os.chmod(staging / name, 0o600)
    previous = os.umask(0o022)
    try:
        settle_file_modes(staging)
    finally:
        os.umask(previous)
    assert {path.stat().st_mode & 0o777 for path in staging.rglob("*") if path.is_file()} == {0o644}
