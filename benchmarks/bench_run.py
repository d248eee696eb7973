"""End-to-end benchmark of the README's main command on the embedded default:

    .venv/bin/python benchmarks/bench_run.py [--preset demo] [--output-dir runs/bench-run]

times `safesteer run --preset demo` (direction, safety tokens, distillation and the closing
before/after check, everything the command does) and prints the wall time against the 10-minute
budget of a 2-core CPU, each stage's share, and the refusal table of base, steered teacher and
student on the held-out sets, all measured in this run. The converted-model cache is warmed first,
so the one-off download and conversion (see bench_load.py) is not counted.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from safesteer.cli import main as cli_main
from safesteer.config import ModelArguments
from safesteer.models.loading import load_model

BUDGET_SECONDS = 600.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--output-dir", default="runs/bench-run")
    args, extra = parser.parse_known_args()

    load_model(ModelArguments())
    start = time.perf_counter()
    code = cli_main(["run", "--preset", args.preset, "--output-dir", args.output_dir, "--overwrite",
                     *extra])
    seconds = time.perf_counter() - start
    if code != 0:
        raise SystemExit(code)

    check = json.loads(Path(args.output_dir, "check.json").read_text(encoding="utf-8"))
    print(f"\nsafesteer run --preset {args.preset}: {seconds:.1f} s wall "
          f"({seconds / BUDGET_SECONDS:.2f} x the {BUDGET_SECONDS:.0f} s budget)")
    for stage, stage_seconds in check["stage_seconds"].items():
        print(f"  {stage:<10}{stage_seconds:>8.1f} s  ({stage_seconds / seconds:.0%})")
    refusal = check["refusal"]
    print(f"{'held-out set':<26}{'n':>4}" + "".join(f"{target:>10}" for target in refusal))
    for name in check["harmful_sets"] + check["benign_sets"]:
        kind = "harmful" if name in check["harmful_sets"] else "benign"
        n = refusal["base"][name]["n"]
        print(f"{name + ' (' + kind + ')':<26}{n:>4.0f}"
              + "".join(f"{refusal[target][name]['refusal']:>10.1%}" for target in refusal))
    summary = {"preset": args.preset, "extra_flags": extra, "wall_seconds": seconds,
               "budget_seconds": BUDGET_SECONDS, **check}
    Path(args.output_dir, "benchmark.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
