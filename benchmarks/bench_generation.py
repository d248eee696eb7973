"""The closing check's answers in bfloat16 products against float32's: speed, answers, verdicts.

    .venv/bin/python benchmarks/bench_generation.py [--direction RUN_DIR] [--limit 20] [--rounds 2]

The greedy answers of the base model and, with ``--direction``, of the steered teacher to the
first ``--limit`` prompts of each check set (64 new tokens, stopped past the judge's window, in
batches of 32, as ``safesteer run``'s check does), in turns both ways on the same float32
weights: float32 products (the default; narrow on a CPU) and ``--generation-dtype bfloat16``.
Printed per target: the median seconds each way and the speed-up, how many answers and first 200
characters are identical, how many keyword verdicts agree, and both refusal rates
(docs/method.md §6.1).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from safesteer.config import DataArguments, ModelArguments
from safesteer.direction import Direction
from safesteer.evaluate.check import STOP_MARGIN
from safesteer.keyword_judge import WINDOW, is_refusal
from safesteer.models import generate_responses, load_model
from safesteer.models.precision import set_generation_dtype
from safesteer.run_config import RunArguments

WAYS = {"float32": None, "bfloat16": torch.bfloat16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--direction", default=None, help="a run directory: its teacher answers too")
    parser.add_argument("--limit", type=int, default=20, help="prompts per check set")
    parser.add_argument("--rounds", type=int, default=2, help="timed passes each way")
    args = parser.parse_args()

    model, tokenizer = load_model(ModelArguments())
    run = RunArguments(output_dir="unused")
    data = DataArguments()
    prompts = [prompt for name in [*run.check_harmful, *run.check_benign]
               for prompt in data.load(name, args.limit)]
    direction = Direction.load(args.direction) if args.direction else None
    targets = {"base": contextlib.nullcontext}
    if direction is not None:
        targets["teacher"] = lambda: direction.steer(model)
    print(f"{model.name_or_path}, {len(prompts)} check prompts, {torch.get_num_threads()} threads")
    for target, steering in targets.items():
        seconds: dict[str, list[float]] = {way: [] for way in WAYS}
        answers: dict[str, list[str]] = {}
        for _ in range(args.rounds):
            for way, dtype in WAYS.items():
                set_generation_dtype(model, dtype)
                start = time.perf_counter()
                with steering():
                    answers[way] = generate_responses(model, tokenizer, prompts, max_new_tokens=64,
                                                      batch_size=32, stop_at_chars=WINDOW + STOP_MARGIN)
                seconds[way].append(time.perf_counter() - start)
        plain, fast = (statistics.median(seconds[way]) for way in WAYS)
        pairs = list(zip(answers["float32"], answers["bfloat16"], strict=True))
        same = sum(a == b for a, b in pairs)
        head = sum(a[:WINDOW] == b[:WINDOW] for a, b in pairs)
        agree = sum(is_refusal(a) == is_refusal(b) for a, b in pairs)
        rates = [sum(map(is_refusal, answers[way])) / len(prompts) for way in WAYS]
        print(f"bench_generation {target}: {plain:.1f} s float32, {fast:.1f} s bfloat16 products "
              f"({plain / fast:.2f}x); answers identical {same}/{len(pairs)}, first {WINDOW} characters "
              f"{head}/{len(pairs)}, verdicts agree {agree}/{len(pairs)}; refusal {rates[0]:.1%} "
              f"float32, {rates[1]:.1%} bfloat16")


if __name__ == "__main__":
    main()
