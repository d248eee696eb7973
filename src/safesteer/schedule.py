"""Jobs run a few at a time, each as soon as what it needs is done and a slot is free, in list
order: ``safesteer compare`` runs its trainings and its per-target evaluations this way, so an
evaluation fills a slot that a training no longer needs."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

from safesteer.errors import SafesteerError


@dataclass(frozen=True)
class Job:
    """``run`` once the jobs named in ``after`` have finished and ``ready()`` holds (polled: e.g.
    files another job writes while it runs, described by ``waits_for``)."""

    name: str
    run: Callable[[], None]
    after: tuple[str, ...] = ()
    ready: Callable[[], bool] | None = None
    waits_for: str = ""


def run_jobs(jobs: Sequence[Job], slots: int, poll_seconds: float = 1.0) -> dict[str, float]:
    """Run every job, at most ``slots`` at a time; among those that may start, the earliest in
    ``jobs`` first. Returns when each finished (``time.perf_counter()``). A failure stops every
    job not yet started, waits for the running ones and is raised; so is a job that can never
    start (nothing runs and it still waits)."""
    waiting, done = list(jobs), dict[str, float]()
    running: dict[Future[None], str] = {}
    with ThreadPoolExecutor(max_workers=slots) as pool:
        while waiting or running:
            for job in list(waiting):
                if len(running) == slots:
                    break
                if done.keys() >= set(job.after) and (job.ready is None or job.ready()):
                    waiting.remove(job)
                    running[pool.submit(job.run)] = job.name
            if not running:
                job = waiting[0]
                missing = ", ".join(sorted(set(job.after) - done.keys()))
                raise SafesteerError(f"{job.name} cannot start: "
                                     + (f"{missing} did not run" if missing else job.waits_for))
            polled = any(job.ready is not None for job in waiting)
            finished, _ = wait(running, timeout=poll_seconds if polled else None, return_when=FIRST_COMPLETED)
            for future in finished:
                name = running.pop(future)
                future.result()
                done[name] = time.perf_counter()
    return done
