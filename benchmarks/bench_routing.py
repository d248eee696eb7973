"""Generation with the linear products as a torch function mode against routed through the
model's linear layers (``LinearMode.on``), in turns on the same weights: same run.

    .venv/bin/python benchmarks/bench_routing.py [--rows 16] [--new-tokens 32] [--rounds 3]

The embedded default samples ``--rows`` completions of the first ``safesteer-train`` prompts
(temperature 1, no top-k, as stage 3 does) in bfloat16 products (``--generation-dtype
bfloat16``) and in float32 ones (few-row products as ``weight @ inputs.T``, the CPU default),
each way as a mode and routed. Printed per dtype: the median seconds of each, the speed-up, and
whether the sampled tokens are identical (docs/method.md §6.1).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from safesteer.config import ModelArguments
from safesteer.data import load_prompts
from safesteer.models import encode_rendered, load_model, render_prompts
from safesteer.models.linears import LinearMode
from safesteer.models.narrow import NarrowLinears
from safesteer.models.precision import BfloatProducts

PRODUCTS: dict[str, Callable[[], LinearMode]] = {"bfloat16": BfloatProducts, "float32 narrow": NarrowLinears}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=16, help="completions sampled at once")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens sampled per completion")
    parser.add_argument("--rounds", type=int, default=3, help="timed passes each way (first is warm-up)")
    args = parser.parse_args()
    model, tokenizer = load_model(ModelArguments(dtype="float32"))
    prompts = render_prompts(tokenizer, load_prompts("safesteer-train", limit=args.rows))
    batch = encode_rendered(tokenizer, prompts, torch.device("cpu"))

    def sample(context: object) -> tuple[float, torch.Tensor]:
        torch.manual_seed(0)
        start = time.perf_counter()
        with torch.no_grad(), context:  # type: ignore[attr-defined]
            tokens = model.generate(**batch, max_new_tokens=args.new_tokens, do_sample=True, top_k=0,
                                    temperature=1.0, top_p=1.0, pad_token_id=tokenizer.pad_token_id)
        return time.perf_counter() - start, tokens

    print(f"{model.name_or_path}, {args.rows} rows x {args.new_tokens} sampled tokens, "
          f"{torch.get_num_threads()} threads")
    for name, make in PRODUCTS.items():
        ways = ("mode", "routed")
        seconds: dict[str, list[float]] = {way: [] for way in ways}
        tokens: dict[str, torch.Tensor] = {}
        for _ in range(args.rounds):
            for way in ways:
                elapsed, tokens[way] = sample(make() if way == "mode" else make().on(model))
                seconds[way].append(elapsed)
        mode, routed = (statistics.median(seconds[way][1:] or seconds[way]) for way in ways)
        print(f"bench_routing {name}: {mode:.2f} s as a mode, {routed:.2f} s routed ({mode / routed:.2f}x); "
              f"tokens identical: {torch.equal(tokens['mode'], tokens['routed'])}")


if __name__ == "__main__":
    main()
