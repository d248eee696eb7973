"""Wall time and peak memory of `safesteer eval` with its default benchmarks and limits:

    .venv/bin/python benchmarks/bench_eval.py [--run-dir runs/bench-run] [--output-dir runs/bench-eval]

evaluates base, steered teacher and student of a `safesteer run` directory (by default the one
`benchmarks/bench_run.py` writes) from scratch — saved completions are deleted first, so nothing is
reused — and prints the wall time against the 15-minute budget of a 2-core CPU, the process's
peak resident memory and the results table.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import time
from pathlib import Path

from safesteer.cli import main as cli_main

BUDGET_SECONDS = 900.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", default="runs/bench-run")
    parser.add_argument("--output-dir", default="runs/bench-eval")
    args, extra = parser.parse_known_args()
    shutil.rmtree(args.output_dir, ignore_errors=True)

    start = time.perf_counter()
    code = cli_main(["eval", "--targets", "base,teacher,student", "--run-dir", args.run_dir,
                     "--output-dir", args.output_dir, *extra])
    seconds = time.perf_counter() - start
    if code != 0:
        raise SystemExit(code)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\nsafesteer eval (base, teacher, student; default benchmarks): {seconds:.1f} s wall "
          f"({seconds / BUDGET_SECONDS:.2f} x the {BUDGET_SECONDS:.0f} s budget), "
          f"peak RSS {peak_mib:.0f} MiB")
    summary = {"wall_seconds": seconds, "budget_seconds": BUDGET_SECONDS, "peak_rss_mib": peak_mib,
               "extra_flags": extra}
    Path(args.output_dir, "benchmark.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
