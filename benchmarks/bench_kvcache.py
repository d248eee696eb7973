"""Generation with a KV cache that has room for the new tokens against transformers' own dynamic
cache, in turns on the same weights: same run.

    .venv/bin/python benchmarks/bench_kvcache.py [--limit 40] [--rounds 3] [--sets SET ...]

The embedded default answers the first ``--limit`` prompts of each set greedily, 64 new tokens in
one batch, in bfloat16 products where the CPU has them (``--generation-dtype auto``), as
``safesteer eval`` does: once with ``generate_ids``'s cache (``safesteer.models.kvcache``), once
with the cache ``generate`` builds itself (each step's keys and values appended by ``torch.cat``).
Printed per set: the longest prompt, the median seconds each way (the first round left out as
warm-up), the speed-up, and whether every answer is identical (docs/method.md §6.1).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from unittest import mock

from safesteer.config import ModelArguments
from safesteer.data import load_prompts
from safesteer.models import generate_responses, load_model, render_prompts
from safesteer.models import generation as generation_module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=40, help="prompts per set")
    parser.add_argument("--rounds", type=int, default=3, help="timed passes each way (first is warm-up)")
    parser.add_argument("--sets", nargs="+", default=["ordinary-test", "harmbench-test"])
    args = parser.parse_args()
    model, tokenizer = load_model(ModelArguments(generation_dtype="auto"))
    print(f"{model.name_or_path}, {args.limit} prompts per set, 64 greedy tokens in one batch")
    for name in args.sets:
        prompts = load_prompts(name, limit=args.limit)
        longest = max(len(tokenizer(text)["input_ids"]) for text in render_prompts(tokenizer, prompts))
        seconds: dict[str, list[float]] = {"roomy": [], "transformers": []}
        answers: dict[str, list[str]] = {}
        for _ in range(args.rounds):
            for way in seconds:
                # transformers' own: generate_ids hands generate no cache, so it builds its own
                with (mock.patch.object(generation_module, "generation_cache", lambda *_: None)
                      if way == "transformers" else contextlib.nullcontext()):
                    start = time.perf_counter()
                    answers[way] = generate_responses(model, tokenizer, prompts, max_new_tokens=64,
                                                      batch_size=len(prompts))
                    seconds[way].append(time.perf_counter() - start)
        roomy, own = (statistics.median(seconds[way][1:] or seconds[way]) for way in seconds)
        print(f"bench_kvcache {name} (longest prompt {longest} tokens): {own:.2f} s transformers' cache, "
              f"{roomy:.2f} s with room ({own / roomy:.2f}x); answers identical: "
              f"{answers['roomy'] == answers['transformers']}")


if __name__ == "__main__":
    main()
