"""Wall time of ``safesteer --help`` and of each command's ``--help``, as a user waits for it: a new
process each time (interpreter start-up and imports included), median of several repeats. The
target is under 1 s: printing help must not import torch or transformers.

    .venv/bin/python benchmarks/bench_help.py [--repeats 7] [--commands run eval ...]

Every command is timed unless ``--commands`` names some.

Also reports whether the help process imported torch or transformers (it must not).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

from safesteer.cli import COMMANDS

TARGET_S = 1.0
_HEAVY = "import sys, runpy; sys.argv = ['safesteer', *{argv!r}]\n" \
         "try:\n    runpy.run_module('safesteer.cli', run_name='__main__')\n" \
         "except SystemExit:\n    pass\n" \
         "print([name for name in ('torch', 'transformers') if name in sys.modules])"


def seconds(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "safesteer.cli", *argv], check=True, capture_output=True)
    return time.perf_counter() - start


def heavy_imports(argv: list[str]) -> str:
    """The heavy libraries a help process has imported, as printed by a process that runs it."""
    process = subprocess.run([sys.executable, "-c", _HEAVY.format(argv=argv)], check=True,
                             capture_output=True, text=True)
    return process.stdout.strip().splitlines()[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7, help="processes per command (median reported)")
    parser.add_argument("--commands", nargs="*", default=list(COMMANDS),
                        help="commands whose --help is timed besides the top-level one (default: all)")
    args = parser.parse_args()
    print(f"python {sys.version.split()[0]}; {args.repeats} repeats; target < {TARGET_S:.1f} s")
    for argv in [["--help"], *([command, "--help"] for command in args.commands)]:
        times = [seconds(argv) for _ in range(args.repeats)]
        median = statistics.median(times)
        verdict = "ok" if median < TARGET_S else "OVER TARGET"
        print(f"safesteer {' '.join(argv):<20} median {median:.2f} s (min {min(times):.2f}, max "
              f"{max(times):.2f})  heavy imports: {heavy_imports(argv)}  {verdict}")


if __name__ == "__main__":
    main()
