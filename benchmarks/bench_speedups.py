"""Stage 3's step with and without its speed-ups, in turns on the same weights: same run.

    .venv/bin/python benchmarks/bench_speedups.py [--steps 3] [--direction RUN_DIR]
        [--config distill_config.json] [--adapter STUDENT_DIR]

One ``Distiller`` on the embedded default (float32; the default DistillConfig, or a run's
``distill_config.json`` with ``--config``; the fresh adapter, or a trained one with ``--adapter``)
samples and backpropagates each step eight ways in turns (docs/method.md §6.1): as before the
speed-ups (every row re-reads its prompt, the LoRA student samples unfolded), with a prompt read
once for its M samples (``share_prompts``), with that and the adapter folded into the weights
for sampling (``adapters_merged``), and with the decode steps' few-row products computed as
``weight @ inputs.T`` too (``narrow_linears``, the default on a CPU); then with all of that plus
the teacher-forced forwards under bfloat16 autocast, first with autocast casting every frozen
weight at every forward, then with their copies kept (``--bf16``, off by default), with the
samples drawn in bfloat16 products instead (``--generation-dtype bfloat16``), and with both. No
optimizer step is taken, so every way sees the same weights. Printed: the median seconds of
sampling and of the backward per step (the first step left out as warm-up), each way's speed-up
over the first and its largest relative difference of loss and gradient norm from the first
(on other samples for the bfloat16-sampling ways), and whether the float32 ways' sampled tokens
are identical.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
from dataclasses import fields
from pathlib import Path

import torch
from bench_distill import SAFETY_WORDS, quick_direction
from peft import set_peft_model_state_dict
from safetensors.torch import load_file

from safesteer.config import ModelArguments
from safesteer.data import load_prompts
from safesteer.direction import Direction
from safesteer.distill import rollout
from safesteer.distill.config import DistillConfig
from safesteer.distill.trainer import Distiller
from safesteer.models import generation, load_model
from safesteer.models.narrow import narrow_linears
from safesteer.models.precision import BfloatProducts

# (prompt read once, adapter folded, decode products, bfloat16 autocast: off, its own casts, or
# with the frozen weights' copies kept as --bf16 does)
WAYS = {"before (re-read, unfolded)": (False, False, "linear", "off"),
        "prompts read once": (True, False, "linear", "off"),
        "read once + folded adapter": (True, True, "linear", "off"),
        "+ narrow decode products": (True, True, "narrow", "off"),
        "+ bf16 autocast, recast": (True, True, "narrow", "recast"),
        "+ bf16 autocast (--bf16)": (True, True, "narrow", "kept"),
        "+ bf16 sampling (generation)": (True, True, "bfloat16", "off"),
        "+ both": (True, True, "bfloat16", "kept")}
PRODUCTS = {"linear": lambda model: contextlib.nullcontext(), "narrow": narrow_linears,
            "bfloat16": lambda model: BfloatProducts().on(model)}
DEFAULT_WAY = "+ narrow decode products"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3, help="steps timed each way (plus one warm-up)")
    parser.add_argument("--direction", default=None, help="run directory of `safesteer direction`")
    parser.add_argument("--config", default=None,
                        help="a run's distill_config.json (default: DistillConfig())")
    parser.add_argument("--adapter", default=None,
                        help="a trained student directory (its adapter_model.safetensors)")
    args = parser.parse_args()

    model, tokenizer = load_model(ModelArguments())
    direction = Direction.load(args.direction) if args.direction else quick_direction(model, tokenizer)
    names = {field.name for field in fields(DistillConfig)}
    settings = json.loads(Path(args.config).read_text()) if args.config else {}
    settings = {key: value for key, value in settings.items() if key in names}
    config = DistillConfig(**{**settings, "save_steps": 0})
    safety_ids = sorted({tokenizer.encode(word, add_special_tokens=False)[0] for word in SAFETY_WORDS})
    prompts = load_prompts("safesteer-train", limit=(args.steps + 1) * config.prompts_per_step)
    seconds = {way: {"sample": [], "backward": []} for way in WAYS}
    identical = True
    gaps = {way: [0.0, 0.0] for way in WAYS}  # largest relative difference of loss, gradient norm
    folded, products = rollout.adapters_merged, generation.generation_products
    with tempfile.TemporaryDirectory() as output_dir:
        distiller = Distiller(model, tokenizer, direction, prompts, config, output_dir,
                              safety_token_ids=safety_ids)
        distiller.setup()
        casts = distiller.weight_casts
        if args.adapter:
            weights = load_file(str(Path(args.adapter) / "adapter_model.safetensors"))
            set_peft_model_state_dict(distiller.student, weights)
        for step in range(1, args.steps + 2):
            results = {}
            for way, (share, fold, product, bf16) in WAYS.items():
                distiller.config.bf16 = bf16 != "off"
                distiller.weight_casts = casts if bf16 == "kept" else None
                distiller.share_prompts = distiller.teachers.share_prompts = share
                rollout.adapters_merged = folded if fold else contextlib.nullcontext  # type: ignore[assignment]
                generation.generation_products = PRODUCTS[product]  # type: ignore[assignment]
                distiller.optimizer.zero_grad(set_to_none=True)
                start = time.perf_counter()
                sampled = distiller.sample(step)
                middle = time.perf_counter()
                metrics = distiller.backward(sampled)
                end = time.perf_counter()
                if step > 1:
                    seconds[way]["sample"].append(middle - start)
                    seconds[way]["backward"].append(end - middle)
                norm = torch.cat([p.grad.flatten() for p in distiller.trainable_parameters]).norm().item()
                results[way] = (sampled.sequences, metrics["loss"], norm)
            first = results[next(iter(WAYS))]
            for way, (sequences, loss, norm) in results.items():
                identical &= WAYS[way][2] == "bfloat16" or torch.equal(sequences, first[0])
                gaps[way][0] = max(gaps[way][0], abs(loss / first[1] - 1))
                gaps[way][1] = max(gaps[way][1], abs(norm / first[2] - 1))
    rollout.adapters_merged, generation.generation_products = folded, products

    print(f"{model.name_or_path}, {args.steps} steps after a warm-up step, "
          f"{config.prompts_per_step} prompts x {config.samples_per_prompt} samples x <= "
          f"{config.max_new_tokens} new tokens, micro-batch {config.micro_batch_size}, "
          f"{'trained' if args.adapter else 'fresh'} adapter, {torch.get_num_threads()} threads")
    totals = {}
    for way in WAYS:
        sample, backward = (statistics.median(seconds[way][phase]) for phase in ("sample", "backward"))
        totals[way] = sample + backward
        print(f"{way:<27} sampling {sample:6.2f} s  backward {backward:6.2f} s  step {totals[way]:6.2f} s  "
              f"{totals[next(iter(WAYS))] / totals[way]:.2f}x  loss {gaps[way][0]:.1e}  "
              f"gradient norm {gaps[way][1]:.1e}")
    before = totals[next(iter(WAYS))]
    recast, bf16, sampling, both = (before / totals[way] for way in list(WAYS)[-4:])
    backwards = [statistics.median(seconds[way]["backward"]) for way in list(WAYS)[-4:-2]]
    print(f"bench_speedups: step {before / totals[DEFAULT_WAY]:.2f}x faster than before by default, "
          f"{bf16:.2f}x with --bf16 ({recast:.2f}x recasting the frozen weights at every forward; "
          f"its backward {backwards[0] / backwards[1]:.2f}x faster with the copies kept), "
          f"{sampling:.2f}x with --generation-dtype bfloat16, {both:.2f}x "
          f"with both; float32 samples {'identical' if identical else 'DIFFERENT'}")


if __name__ == "__main__":
    main()
