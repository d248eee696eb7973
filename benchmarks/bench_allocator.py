"""The ``safesteer`` command's allocator setting on and off: a demo run's stage-3 steps, in turns.

    .venv/bin/python benchmarks/bench_allocator.py RUN_DIR [--steps 6] [--rounds 2]

``RUN_DIR`` is a finished ``safesteer run --preset demo`` (``make demo``): its direction and safety
tokens are copied into a fresh directory, and ``safesteer run --preset demo --resume
--check-limit 0`` trains the first ``--steps`` steps there (stages 1 and 2 loaded, not redone),
once with the setting of :mod:`safesteer.allocator` (the command's default) and once with
``SAFESTEER_SYSTEM_MALLOC=1`` (glibc's defaults), and, where the system has jemalloc (Debian and
Ubuntu: ``libjemalloc2``), once with it in ``LD_PRELOAD`` (which the command leaves alone), each
in its own process, alternating for ``--rounds`` rounds. Printed: each way's median seconds per
step (the first step left out), user and system CPU seconds and peak resident memory of the
process, the ratios, and whether every way logged bitwise the same losses and gradient norms
(docs/method.md §6.1).
"""

from __future__ import annotations

import argparse
import ctypes.util
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from safesteer.allocator import tunes_allocator
from safesteer.direction.artifact import DIRECTION_FILES
from safesteer.distill.checkpoint import LOG_FILE
from safesteer.io import MANIFEST_FILE

STAGE_FILES = (*DIRECTION_FILES, "safety_tokens.json", MANIFEST_FILE)
WAYS = {"kept for reuse": {}, "glibc defaults": {"SAFESTEER_SYSTEM_MALLOC": "1"}}


def child(run_dir: str, steps: int) -> None:
    """Train ``steps`` steps of the demo in ``run_dir`` through the command, then print the log and
    this process's CPU seconds and peak memory as one JSON line."""
    from safesteer import cli
    from safesteer.distill.trainer import Distiller

    train = Distiller.train
    Distiller.train = lambda self, max_steps=None: train(self, max_steps=steps)  # type: ignore[method-assign]
    code = cli.main(["run", "--preset", "demo", "--output-dir", run_dir, "--resume", "--check-limit", "0"])
    usage = resource.getrusage(resource.RUSAGE_SELF)
    log = [json.loads(line) for line in (Path(run_dir) / LOG_FILE).read_text().splitlines()]
    print(json.dumps({"code": code, "log": log, "user": usage.ru_utime, "system": usage.ru_stime,
                      "peak_rss_mib": usage.ru_maxrss / 1024}))


def measure(source: Path, steps: int, environment: dict[str, str]) -> dict:
    with tempfile.TemporaryDirectory() as run_dir:
        for name in STAGE_FILES:
            shutil.copy2(source / name, Path(run_dir) / name)
        done = subprocess.run([sys.executable, __file__, "--child", run_dir, "--steps", str(steps)],
                              env={**os.environ, **environment}, check=True, capture_output=True, text=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["code"]:
        raise SystemExit(f"safesteer run failed ({result['code']}): {done.stderr[-2000:]}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a finished `safesteer run --preset demo` directory")
    parser.add_argument("--steps", type=int, default=6, help="steps per process (the first is warm-up)")
    parser.add_argument("--rounds", type=int, default=2, help="processes each way, in turns")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.run_dir, args.steps)
        return
    if any(tunes_allocator(name, value) for name, value in os.environ.items()):
        raise SystemExit("unset MALLOC_*, LD_PRELOAD and SAFESTEER_SYSTEM_MALLOC first: they turn the "
                         "setting off both ways")
    ways = dict(WAYS)
    if library := ctypes.util.find_library("jemalloc"):  # Debian and Ubuntu: libjemalloc2
        ways["jemalloc preloaded"] = {"LD_PRELOAD": library}
    runs: dict[str, list[dict]] = {way: [] for way in ways}
    for _ in range(args.rounds):
        for way, environment in ways.items():
            runs[way].append(measure(Path(args.run_dir), args.steps, environment))
    print(f"{args.run_dir}: {args.steps} demo steps per process (the first left out), {args.rounds} "
          "processes each way, in turns")
    step, peak = {}, {}
    for way, results in runs.items():
        step[way] = statistics.median(row["seconds"] for result in results for row in result["log"][1:])
        peak[way] = max(result["peak_rss_mib"] for result in results)
        user, system = (statistics.median(result[key] for result in results) for key in ("user", "system"))
        print(f"{way:<18} {step[way]:6.2f} s/step  user {user:6.1f} s  system {system:5.1f} s  peak RSS "
              f"{peak[way]:6.0f} MiB")
    keys = ("loss", "kl_k3", "grad_norm")
    logs = [[tuple(row[key] for key in keys) for row in result["log"]]
            for results in runs.values() for result in results]
    same = all(log == logs[0] for log in logs)
    kept, system, preloaded = "kept for reuse", "glibc defaults", "jemalloc preloaded"
    print(f"bench_allocator: a step {step[system] / step[kept]:.2f}x faster with freed memory kept, "
          f"peak RSS {peak[kept] / peak[system]:.2f}x; losses and gradient norms "
          f"{'bitwise the same' if same else 'DIFFERENT'}")
    if preloaded in runs:
        print(f"bench_allocator: jemalloc preloaded, a step {step[kept] / step[preloaded]:.2f}x as fast as "
              f"with freed memory kept, peak RSS {peak[preloaded] / peak[kept]:.2f}x")


if __name__ == "__main__":
    main()
