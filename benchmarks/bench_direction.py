"""Stage-1 benchmark on the embedded default: wall time of `safesteer direction` and the steered
teacher's refusal on held-out prompts, next to the base model measured in the same run.

    .venv/bin/python benchmarks/bench_direction.py [--limit 100] [--output-dir runs/bench-direction]

Held-out sets are disjoint from the direction's training and validation prompts: HarmBench test
(standard) and JailbreakBench behaviours for harmful refusal, the harmless test split for benign
refusal. The budget in the issue is 300 s for the direction on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from safesteer.cli import main as cli_main
from safesteer.config import ModelArguments
from safesteer.data import load_prompts
from safesteer.direction import Direction
from safesteer.keyword_judge import refusal_rate
from safesteer.models.generation import generate_responses
from safesteer.models.loading import load_model

HELD_OUT = {"harmbench-test": "harmful", "jbb": "harmful", "harmless-test": "harmless"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="runs/bench-direction")
    parser.add_argument("--limit", type=int, default=100, help="prompts per held-out set")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()

    load_model(ModelArguments())  # warm the converted-model cache so the timing is the method's own
    start = time.perf_counter()
    code = cli_main(["direction", "--output-dir", args.output_dir, "--overwrite"])
    direction_seconds = time.perf_counter() - start
    if code != 0:
        raise SystemExit(code)

    model, tokenizer = load_model(ModelArguments())
    direction = Direction.load(args.output_dir)
    rows = {}
    for name, kind in HELD_OUT.items():
        prompts = load_prompts(name, limit=args.limit)
        options = {"max_new_tokens": args.max_new_tokens, "batch_size": 32}
        base = generate_responses(model, tokenizer, prompts, desc=f"base {name}", **options)
        with direction.steer(model):
            teacher = generate_responses(model, tokenizer, prompts, desc=f"teacher {name}", **options)
        rows[name] = {"kind": kind, "n": len(prompts), "base_refusal": refusal_rate(base),
                      "teacher_refusal": refusal_rate(teacher)}

    print(f"\ndirection: method {direction.metadata['method']}, layer {direction.layer}, "
          f"beta {direction.metadata['beta']}, coefficient {direction.coefficient:.4g}")
    print(f"safesteer direction wall time: {direction_seconds:.1f} s "
          f"({direction_seconds / 300:.2f} x the 300 s budget)")
    print(f"{'held-out set':<16}{'kind':<10}{'n':>5}{'base':>8}{'teacher':>9}")
    for name, row in rows.items():
        print(f"{name:<16}{row['kind']:<10}{row['n']:>5}{row['base_refusal']:>8.1%}"
              f"{row['teacher_refusal']:>9.1%}")
    summary = {"direction_seconds": direction_seconds, "held_out": rows,
               "layer": direction.layer, "coefficient": direction.coefficient,
               "method": direction.metadata["method"]}
    Path(args.output_dir, "benchmark.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
