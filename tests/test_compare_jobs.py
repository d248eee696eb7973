"""`safesteer compare`'s jobs: trainings and per-target evaluations as subprocesses, run a few at a
time (``safesteer run`` and ``safesteer eval`` replaced by fakes that record what ran)."""

from __future__ import annotations

import itertools
import sys
import time

import pytest

from safesteer import compare_jobs
from safesteer.arguments import parse
from safesteer.cli import COMMANDS
from safesteer.compare_config import Method
from safesteer.compare_jobs import evaluate_target, evaluation_jobs, job_env, train_method, training_jobs
from safesteer.config import DataArguments, ModelArguments
from safesteer.direction.artifact import DIRECTION_FILES
from safesteer.errors import SafesteerError
from safesteer.evaluate.config import EvalArguments
from safesteer.schedule import run_jobs


def train_methods(methods, plans, output_dir, jobs) -> None:
    run_jobs(training_jobs(methods, plans, output_dir, job_env(jobs)), jobs, poll_seconds=0.01)


def test_stream_copies_the_output_to_the_log_and_returns_the_status(tmp_path, capsys) -> None:
    log = tmp_path / "run" / "compare.log"
    code = compare_jobs._stream([sys.executable, "-c", "print('hello'); raise SystemExit(3)"], log, "[m] ")
    assert code == 3
    assert "[m] hello" in capsys.readouterr().out
    assert log.read_text().splitlines()[1:] == ["hello"]


def test_stream_adds_env_to_the_environment(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("SAFESTEER_TEST_KEPT", "kept")
    code = "import os; print(os.environ['SAFESTEER_TEST_KEPT'], os.environ['SAFESTEER_TEST_ADDED'])"
    added = {"SAFESTEER_TEST_ADDED": "a"}
    assert compare_jobs._stream([sys.executable, "-c", code], tmp_path / "log", "", added) == 0
    assert capsys.readouterr().out == "kept a\n"


def _fake_runs(monkeypatch, fail: str | None = None,
               stages: bool = True) -> list[tuple[str, str, float, float, float]]:
    """`safesteer run` replaced by one that writes its stage files after 0.1 s, then a student
    after 0.2 s more (at once, failing, for the method ``fail``; without stage files unless
    ``stages``); returns what ran: (method, OMP_WAIT_POLICY given, start, stages written, end)."""
    runs: list[tuple[str, str, float, float, float]] = []

    def fake(command, log, prefix, env=None):
        start = time.perf_counter()
        run_dir, policy = log.parent, (env or {}).get("OMP_WAIT_POLICY", "")
        if run_dir.name == fail:
            runs.append((run_dir.name, policy, start, start, start))
            return 1
        time.sleep(0.1)
        for name in compare_jobs.SHARED_FILES if stages else ():
            (run_dir / name).write_text(name)
        staged = time.perf_counter()
        (run_dir / "student").mkdir()
        time.sleep(0.2)
        runs.append((run_dir.name, policy, start, staged, time.perf_counter()))
        return 0

    monkeypatch.setattr(compare_jobs, "_stream", fake)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    return runs


def test_methods_train_jobs_at_a_time_once_the_first_wrote_the_shared_stages(tmp_path, monkeypatch) -> None:
    runs = _fake_runs(monkeypatch)
    methods = [Method(name, run={}) for name in ("first", "a", "b", "c")]
    plans = {method.name: ([], {"name": method.name}) for method in methods}
    train_methods(methods, plans, tmp_path, jobs=2)
    first = next(run for run in runs if run[0] == "first")
    rest = [run for run in runs if run[0] != "first"]
    assert sorted(run[0] for run in rest) == ["a", "b", "c"]
    assert all(run[1] == "PASSIVE" for run in runs)
    assert all(run[2] >= first[3] for run in rest)  # after the stages, not after the first's end
    assert min(run[2] for run in rest) < first[4]
    assert max(sum(other[2] <= run[2] < other[4] for other in runs) for run in runs) == 2
    for method in methods[1:]:  # each got the first one's stages 1-2
        assert (tmp_path / "runs" / method.name / "safety_tokens.json").read_text() == "safety_tokens.json"
    one_at_a_time = _fake_runs(monkeypatch)
    train_methods(methods, plans, tmp_path / "again", jobs=1)
    assert [run[:2] for run in one_at_a_time] == [(method.name, "") for method in methods]
    assert all(later[2] >= earlier[4] for earlier, later in itertools.pairwise(one_at_a_time))


def test_a_failed_method_stops_those_not_started(tmp_path, monkeypatch) -> None:
    runs = _fake_runs(monkeypatch, fail="a")
    methods = [Method(name, run={}) for name in ("first", "a", "b", "c", "d")]
    plans = {method.name: ([], {}) for method in methods}
    with pytest.raises(SafesteerError, match="method 'a'"):
        train_methods(methods, plans, tmp_path, jobs=2)
    assert [run[0] for run in runs] == ["a", "first"]  # the first ran on; b, c and d never started
    _fake_runs(monkeypatch, stages=False)
    with pytest.raises(SafesteerError, match="method 'first' finished without its stages 1-2"):
        train_methods(methods, plans, tmp_path / "no-stages", jobs=2)


def test_a_failed_run_names_the_method_and_its_log(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(compare_jobs, "_stream", lambda command, log, prefix, env=None: 1)
    with pytest.raises(SafesteerError, match=r"method 'm': `safesteer run` failed .* see .*m/compare\.log"):
        train_method(Method("m", run={}), tmp_path / "m", [], {"mode": "full"})
    assert not (tmp_path / "m" / compare_jobs.SETTINGS_FILE).exists()


def test_a_finished_run_is_reused_only_with_the_same_settings(tmp_path, monkeypatch, capsys) -> None:
    calls: list[list[str]] = []
    monkeypatch.setattr(compare_jobs, "_stream",
                        lambda command, log, prefix, env=None: calls.append(command) or 0)
    run_dir = tmp_path / "m"
    (run_dir / "student").mkdir(parents=True)
    train_method(Method("m", run={}), run_dir, ["--x"], {"mode": "full"})
    assert calls[0][1:] == ["-m", "safesteer.cli", "run", "--x"]
    train_method(Method("m", run={}), run_dir, ["--x"], {"mode": "full"})
    assert len(calls) == 1 and "reused" in capsys.readouterr().out
    with pytest.raises(SafesteerError, match=r"other settings \(mode \('full' -> 'topk'\)\); delete"):
        train_method(Method("m", run={}), run_dir, ["--x"], {"mode": "topk"})


def test_each_target_is_evaluated_after_its_training_and_the_base(tmp_path) -> None:
    source = tmp_path / "runs" / "m"
    args = EvalArguments(output_dir=str(tmp_path / "eval"), targets=["base"])
    jobs = evaluation_jobs(["base", "teacher", f"m={source / 'student'}"], {"m": "train m"}, args,
                           ModelArguments(), DataArguments(), source, None)
    assert [(job.name, job.after) for job in jobs] == [
        ("eval base", ()), ("eval teacher", ("eval base",)), ("eval m", ("train m", "eval base"))]
    assert not any(job.ready() for job in jobs)  # the direction is not there yet
    source.mkdir(parents=True)
    for name in DIRECTION_FILES:  # stage 2's safety tokens are not needed
        (source / name).write_text(name)
    assert all(job.ready() for job in jobs)


def test_a_target_s_evaluation_shares_the_saved_answers_and_names_its_log_on_failure(
        tmp_path, monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(compare_jobs, "_stream",
                        lambda command, log, prefix, env=None: calls.append((command, log, env)) or 0)
    args = EvalArguments(output_dir=str(tmp_path / "eval"), targets=["base"], limit=7)
    evaluate_target("opd=runs/opd/student", args, ModelArguments(dtype="float32"), DataArguments(),
                    {"OMP_WAIT_POLICY": "PASSIVE"})
    command, log, env = calls[0]
    assert command[1:4] == ["-m", "safesteer.cli", "eval"]
    parsed = parse(COMMANDS["eval"], command[4:])
    evaluation = next(item for item in parsed if isinstance(item, EvalArguments))
    assert evaluation.targets == ["opd=runs/opd/student"] and evaluation.limit == 7
    assert evaluation.output_dir == str(tmp_path / "eval" / "targets" / "opd")
    assert evaluation.completions_dir == str(tmp_path / "eval" / "completions")
    assert next(item for item in parsed if isinstance(item, ModelArguments)).dtype == "float32"
    assert log == tmp_path / "eval" / "targets" / "opd" / "compare.log"
    assert env == {"OMP_WAIT_POLICY": "PASSIVE"}
    monkeypatch.setattr(compare_jobs, "_stream", lambda command, log, prefix, env=None: 2)
    failed = r"target 'opd': `safesteer eval` failed .* see .*opd/compare\.log"
    with pytest.raises(SafesteerError, match=failed):
        evaluate_target("opd=runs/opd/student", args, ModelArguments(), DataArguments(), None)
