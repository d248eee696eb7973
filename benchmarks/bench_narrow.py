"""Few-row products as ``weight @ inputs.T`` against ``F.linear``: per shape, then whole answers.

    .venv/bin/python benchmarks/bench_narrow.py [--rows 16 64 128] [--limit 20] [--rounds 2]

First each linear shape of the embedded default at ``--rows`` rows, both ways in turns over as
many distinct weights as the model holds of that shape (so the weights come from memory, as in a
decode step, not from cache), median of 3 passes. Then the closing check's greedy answers of the
base model (the first ``--limit`` prompts of each check set, 64 new tokens, stopped past the
judge's window as ``safesteer run`` does), ``--rounds`` times each way in turns: seconds, the
speed-up and how many answers are identical (docs/method.md §6.1).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections import Counter

import torch
import torch.nn.functional as F

from safesteer.config import DataArguments, ModelArguments
from safesteer.evaluate.check import STOP_MARGIN
from safesteer.keyword_judge import WINDOW
from safesteer.models import generation, load_model
from safesteer.models.narrow import NarrowLinears, narrow_linears
from safesteer.run_config import RunArguments


def product_seconds(weights: list[torch.Tensor], rows: int, narrow: bool) -> float:
    """Median over 3 passes of the mean seconds of one product with each of ``weights``."""
    inputs = torch.randn(rows, weights[0].shape[1])
    context = NarrowLinears(max_rows=rows) if narrow else contextlib.nullcontext()
    passes = []
    with torch.no_grad(), context:
        for _ in range(4):
            start = time.perf_counter()
            for weight in weights:
                F.linear(inputs, weight)
            passes.append((time.perf_counter() - start) / len(weights))
    return statistics.median(passes[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[16, 64, 128])
    parser.add_argument("--limit", type=int, default=20, help="prompts per check set")
    parser.add_argument("--rounds", type=int, default=2, help="timed answer passes each way")
    args = parser.parse_args()

    model, tokenizer = load_model(ModelArguments())
    model.eval()
    shapes = Counter(tuple(module.weight.shape) for module in model.modules()
                     if isinstance(module, torch.nn.Linear))
    print(f"{model.name_or_path}, {torch.get_num_threads()} threads; ms per product (linear / narrow)")
    for (out_features, in_features), count in sorted(shapes.items()):
        weights = [torch.randn(out_features, in_features) for _ in range(count)]
        cells = []
        for rows in args.rows:
            plain, narrow = (product_seconds(weights, rows, way) for way in (False, True))
            cells.append(f"{rows} rows {1e3 * plain:.3f} / {1e3 * narrow:.3f} ({plain / narrow:.2f}x)")
        print(f"{out_features}x{in_features} (x{count}): " + ", ".join(cells))

    run = RunArguments(output_dir="unused")
    data = DataArguments()
    prompts = [prompt for name in [*run.check_harmful, *run.check_benign]
               for prompt in data.load(name, args.limit)]
    products = generation.generation_products
    seconds: dict[bool, list[float]] = {False: [], True: []}
    answers: dict[bool, list[str]] = {}
    for _ in range(args.rounds):
        for narrow in (False, True):
            generation.generation_products = (  # type: ignore[assignment]
                narrow_linears if narrow else lambda model: contextlib.nullcontext())
            start = time.perf_counter()
            answers[narrow] = generation.generate_responses(
                model, tokenizer, prompts, max_new_tokens=64, batch_size=32,
                stop_at_chars=WINDOW + STOP_MARGIN)
            seconds[narrow].append(time.perf_counter() - start)
    generation.generation_products = products
    plain, narrow = (statistics.median(seconds[way]) for way in (False, True))
    same = sum(a == b for a, b in zip(answers[False], answers[True], strict=True))
    print(f"bench_narrow: {len(prompts)} check answers in {plain:.1f} s with F.linear, {narrow:.1f} s "
          f"narrow ({plain / narrow:.2f}x); {same} of {len(prompts)} answers identical")


if __name__ == "__main__":
    main()
