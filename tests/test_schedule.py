"""Jobs a few at a time, each once what it needs is done (:mod:`safesteer.schedule`)."""

from __future__ import annotations

import threading
import time

import pytest

from safesteer.errors import SafesteerError
from safesteer.schedule import Job, run_jobs


def _recording(log: list[tuple[str, str, float]], name: str, seconds: float = 0.05,
               fail: bool = False):
    def run() -> None:
        log.append((name, "start", time.perf_counter()))
        time.sleep(seconds)
        if fail:
            raise RuntimeError(f"{name} failed")
        log.append((name, "end", time.perf_counter()))
    return run


def _at(log, name: str, event: str) -> float:
    return next(moment for job, kind, moment in log if job == name and kind == event)


def test_jobs_wait_for_those_they_come_after_and_never_exceed_the_slots() -> None:
    log: list[tuple[str, str, float]] = []
    jobs = [Job("a", _recording(log, "a", 0.2)), Job("b", _recording(log, "b")),
            Job("c", _recording(log, "c"), after=("a",)), Job("d", _recording(log, "d"), after=("b",))]
    finished = run_jobs(jobs, slots=2, poll_seconds=0.01)
    assert set(finished) == {"a", "b", "c", "d"}
    assert _at(log, "c", "start") >= _at(log, "a", "end")
    assert _at(log, "d", "start") >= _at(log, "b", "end")
    assert _at(log, "d", "start") < _at(log, "a", "end")  # d did not wait behind c, which waits for a
    moments = sorted((moment, +1 if kind == "start" else -1) for _, kind, moment in log)
    running = [sum(step for _, step in moments[:index + 1]) for index in range(len(moments))]
    assert max(running) == 2
    assert all(finished[name] >= _at(log, name, "end") for name in finished)


def test_among_jobs_that_may_start_the_earliest_listed_goes_first() -> None:
    log: list[tuple[str, str, float]] = []
    run_jobs([Job(name, _recording(log, name, 0.01)) for name in "abcd"], slots=1)
    assert [name for name, kind, _ in log if kind == "start"] == list("abcd")


def test_a_polled_condition_starts_a_job_while_another_still_runs() -> None:
    log: list[tuple[str, str, float]] = []
    flag = threading.Event()

    def first() -> None:
        log.append(("first", "start", time.perf_counter()))
        time.sleep(0.05)
        flag.set()
        time.sleep(0.3)
        log.append(("first", "end", time.perf_counter()))

    run_jobs([Job("first", first), Job("second", _recording(log, "second"), ready=flag.is_set)],
             slots=2, poll_seconds=0.01)
    assert _at(log, "first", "start") < _at(log, "second", "start") < _at(log, "first", "end")


def test_a_failure_stops_the_jobs_not_started_and_lets_the_running_finish() -> None:
    log: list[tuple[str, str, float]] = []
    jobs = [Job("slow", _recording(log, "slow", 0.2)), Job("bad", _recording(log, "bad", fail=True)),
            Job("later", _recording(log, "later"))]
    with pytest.raises(RuntimeError, match="bad failed"):
        run_jobs(jobs, slots=2)
    assert [(name, kind) for name, kind, _ in log] == [("slow", "start"), ("bad", "start"), ("slow", "end")]


def test_a_job_that_can_never_start_is_named_with_what_it_waits_for() -> None:
    with pytest.raises(SafesteerError, match="b cannot start: the stages were never written"):
        run_jobs([Job("a", lambda: None), Job("b", lambda: None, ready=lambda: False,
                                                  waits_for="the stages were never written")], slots=2)
    with pytest.raises(SafesteerError, match="c cannot start: missing did not run"):
        run_jobs([Job("c", lambda: None, after=("missing",))], slots=1)
