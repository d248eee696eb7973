"""`safesteer compare --jobs 2` against one method at a time: trainings one after the other, then
the same trainings at once, in one run.

    .venv/bin/python benchmarks/bench_jobs.py RUN_DIR [--jobs 2] [--prompts 32] [--work-dir DIR]

RUN_DIR is a finished `safesteer run --preset demo` (`make demo` makes runs/demo): its direction
and safety tokens are copied into each training's directory, as compare shares the first method's.
Each training is `safesteer run --preset demo --resume` on ``--prompts`` harmful training prompts
(no retain prompts: 4 per step, so 8 steps by default), with its own seed (42, 43, ...), in its
own process. One way runs the ``--jobs`` trainings one after the other as they are; the other runs
them at once with ``OMP_WAIT_POLICY=PASSIVE``, as compare does. Prints each way's wall seconds
(process start, model load and the closing save included), the speed-up, and whether each seed's
student adapter is byte for byte the same both ways.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from safesteer.compare_jobs import share_stages
from safesteer.io import RUN_KIND, claim_output_dir

WAYS = ("one after the other", "at once")


def _commands(source: Path, work: Path, jobs: int, prompts: int) -> list[list[str]]:
    commands = []
    for job in range(jobs):
        run_dir = claim_output_dir(work / f"seed-{42 + job}", RUN_KIND)
        share_stages(source, run_dir)
        commands.append([sys.executable, "-m", "safesteer.cli", "run", "--preset", "demo", "--resume",
                         "--output-dir", str(run_dir), "--check-limit", "0", "--n-train-prompts",
                         str(prompts), "--n-retain-prompts", "0", "--seed", str(42 + job)])
    return commands


def _run(commands: list[list[str]], together: bool, log: Path) -> float:
    """Wall seconds of ``commands``, at once or one after the other; fails on a failed training."""
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"} if together else None
    with log.open("w", encoding="utf-8") as output:
        start = time.perf_counter()
        if together:
            processes = [subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env)
                         for command in commands]
            codes = [process.wait() for process in processes]
        else:
            codes = [subprocess.run(command, stdout=output, stderr=subprocess.STDOUT, check=False).returncode
                     for command in commands]
        seconds = time.perf_counter() - start
    if any(codes):
        raise SystemExit(f"a training failed (exit status {codes}); see {log}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a finished `safesteer run --preset demo` directory")
    parser.add_argument("--jobs", type=int, default=2, help="trainings, one process each")
    parser.add_argument("--prompts", type=int, default=32, help="harmful training prompts per training")
    parser.add_argument("--work-dir", type=Path, default=None, help="kept for inspection (default: a "
                                                                    "temporary directory)")
    args = parser.parse_args()

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench-jobs-"))
    seconds, students = {}, {}
    for way in WAYS:
        directory = work / way.replace(" ", "-")
        shutil.rmtree(directory, ignore_errors=True)
        commands = _commands(args.run_dir, directory, args.jobs, args.prompts)
        seconds[way] = _run(commands, way == "at once", directory.with_suffix(".log"))
        students[way] = [(directory / f"seed-{42 + job}" / "student" / "adapter_model.safetensors")
                         .read_bytes() for job in range(args.jobs)]
        print(f"{args.jobs} trainings {way}: {seconds[way]:.1f} s")
    print(f"speed-up at once: {seconds['one after the other'] / seconds['at once']:.2f}x; students "
          + ("byte for byte the same both ways" if students[WAYS[0]] == students[WAYS[1]] else "DIFFER"))
    if args.work_dir is None:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
