"""Stage-3 benchmark on the embedded default: seconds per distillation step and peak memory.

    .venv/bin/python benchmarks/bench_distill.py [--steps 3] [--direction RUN_DIR] [--dtype bfloat16]

Runs the first ``--steps`` optimizer steps of the default DistillConfig (LoRA, 4 prompts x 4
samples x ``--max-new-tokens``) on the ``safesteer-train`` prompts and prints each step's log line,
the median step time and the process's peak resident memory. Without ``--direction`` a quick
response-contrast direction is built (layer 16, beta 0.2, 16 prompts: the setting findings.md
measured). The safety tokens are a stand-in for stage 2: the first token of a few refusal and
safety words. Timings on a shared machine vary up to 2x: compare medians from the same run.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import tempfile
from pathlib import Path

from safesteer.config import ModelArguments
from safesteer.data import load_prompts
from safesteer.direction import (
    COMPLIANCE_TEMPLATES,
    REFUSAL_TEMPLATES,
    Direction,
    mean_response_activations,
)
from safesteer.distill.checkpoint import LOG_FILE
from safesteer.distill.config import DistillConfig
from safesteer.distill.trainer import Distiller
from safesteer.models.loading import load_model

SAFETY_WORDS = ("I", "As", "Sorry", "Unfortunately", " sorry", " cannot", " illegal", " unethical",
                " harmful", " assist", " provide", " help")


def add_int_options(parser: argparse.ArgumentParser, names: tuple[str, ...]) -> None:
    """``--name`` options for integer DistillConfig fields, defaulting to the config's own defaults."""
    defaults = DistillConfig()
    for name in names:
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))


def quick_direction(model, tokenizer, layer: int = 16, beta: float = 0.2, n: int = 16) -> Direction:
    prompts = load_prompts("direction-harmful-train", limit=n)
    refusals = [REFUSAL_TEMPLATES[i % len(REFUSAL_TEMPLATES)] for i in range(n)]
    compliances = [COMPLIANCE_TEMPLATES[i % len(COMPLIANCE_TEMPLATES)] for i in range(n)]
    refuse, refuse_norms = mean_response_activations(model, tokenizer, prompts, refusals, 16)
    comply, comply_norms = mean_response_activations(model, tokenizer, prompts, compliances, 16)
    vector = (refuse - comply)[layer].float()
    residual_norm = ((refuse_norms + comply_norms) / 2)[layer].item()
    return Direction(vector, layer, beta * residual_norm / vector.norm().item(),
                     {"method": "response", "beta": beta})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--direction", default=None, help="run directory of `safesteer direction`")
    args = parser.parse_args()

    model, tokenizer = load_model(ModelArguments(dtype=args.dtype))
    direction = Direction.load(args.direction) if args.direction else quick_direction(model, tokenizer)
    safety_ids = sorted({tokenizer.encode(word, add_special_tokens=False)[0] for word in SAFETY_WORDS})
    config = DistillConfig(max_new_tokens=args.max_new_tokens)
    prompts = load_prompts("safesteer-train")
    with tempfile.TemporaryDirectory() as output_dir:
        distiller = Distiller(model, tokenizer, direction, prompts, config, output_dir,
                              safety_token_ids=safety_ids)
        distiller.setup()
        distiller.train(max_steps=args.steps)
        log = [json.loads(line) for line in (Path(output_dir) / LOG_FILE).read_text().splitlines()]
    for row in log:
        print(" ".join(f"{key}={value:.4g}" for key, value in row.items()))
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\n{args.dtype}, {config.prompts_per_step} prompts x {config.samples_per_prompt} samples x "
          f"{args.max_new_tokens} tokens: median {statistics.median(r['seconds'] for r in log):.1f} s/step "
          f"(first step included), peak RSS {peak_mib:.0f} MiB, |S| = {len(safety_ids)}")


if __name__ == "__main__":
    main()
