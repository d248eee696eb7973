"""Stage 3 reading a prompt once for its M samples, against every row re-reading it: same run.

    .venv/bin/python benchmarks/bench_share.py [--steps 3] [--direction RUN_DIR] [--config JSON]

One ``Distiller`` on the embedded default (float32, the default DistillConfig, or a run's
``distill_config.json`` with ``--config``) samples and backpropagates the same steps twice in
turns, with ``share_prompts`` on and off (docs/method.md §6.1): sampling continues each prompt's
KV cache, and teacher and student read each distinct prompt of a micro-batch once. No optimizer
step is taken, so both ways see the same weights. Printed: seconds of sampling and of the
backward per step (median over the steps, the first step's pair left out as warm-up), their ratio,
whether the sampled tokens are identical and the largest relative difference of loss and gradient
norm.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import fields
from pathlib import Path

import torch
from bench_distill import SAFETY_WORDS, quick_direction

from safesteer.config import ModelArguments
from safesteer.data import load_prompts
from safesteer.direction import Direction
from safesteer.distill.config import DistillConfig
from safesteer.distill.trainer import Distiller
from safesteer.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3, help="steps timed each way (plus one warm-up)")
    parser.add_argument("--direction", default=None, help="run directory of `safesteer direction`")
    parser.add_argument("--config", default=None,
                        help="a run's distill_config.json (default: DistillConfig())")
    args = parser.parse_args()

    model, tokenizer = load_model(ModelArguments())
    direction = Direction.load(args.direction) if args.direction else quick_direction(model, tokenizer)
    names = {field.name for field in fields(DistillConfig)}
    settings = json.loads(Path(args.config).read_text()) if args.config else {}
    settings = {key: value for key, value in settings.items() if key in names}
    config = DistillConfig(**{**settings, "save_steps": 0})
    safety_ids = sorted({tokenizer.encode(word, add_special_tokens=False)[0] for word in SAFETY_WORDS})
    prompts = load_prompts("safesteer-train", limit=(args.steps + 1) * config.prompts_per_step)
    seconds: dict[bool, dict[str, list[float]]] = {True: {"sample": [], "backward": []},
                                                   False: {"sample": [], "backward": []}}
    identical, loss_gap, norm_gap = True, 0.0, 0.0
    with tempfile.TemporaryDirectory() as output_dir:
        distiller = Distiller(model, tokenizer, direction, prompts, config, output_dir,
                              safety_token_ids=safety_ids)
        distiller.setup()
        for step in range(1, args.steps + 2):
            results = {}
            for share in (False, True):
                distiller.share_prompts = distiller.teachers.share_prompts = share
                distiller.optimizer.zero_grad(set_to_none=True)
                start = time.perf_counter()
                rollout = distiller.sample(step)
                middle = time.perf_counter()
                metrics = distiller.backward(rollout)
                end = time.perf_counter()
                if step > 1:
                    seconds[share]["sample"].append(middle - start)
                    seconds[share]["backward"].append(end - middle)
                norm = torch.cat([p.grad.flatten() for p in distiller.trainable_parameters]).norm().item()
                results[share] = (rollout.sequences, metrics["loss"], norm)
            identical &= torch.equal(results[True][0], results[False][0])
            loss_gap = max(loss_gap, abs(results[True][1] / results[False][1] - 1))
            norm_gap = max(norm_gap, abs(results[True][2] / results[False][2] - 1))

    print(f"{model.name_or_path}, {args.steps} steps after a warm-up step, "
          f"{config.prompts_per_step} prompts x {config.samples_per_prompt} samples x <= "
          f"{config.max_new_tokens} new tokens, micro-batch "
          f"{config.micro_batch_size}, {torch.get_num_threads()} threads")
    totals = {}
    for share, label in ((False, "every row re-reads its prompt"), (True, "a prompt read once")):
        sample, backward = (statistics.median(seconds[share][phase]) for phase in ("sample", "backward"))
        totals[share] = sample + backward
        print(f"{label:<30} sampling {sample:6.2f} s  backward {backward:6.2f} s  "
              f"step {sample + backward:6.2f} s")
    print(f"bench_share: step {totals[False] / totals[True]:.2f}x faster with prompts read once; samples "
          f"{'identical' if identical else 'DIFFERENT'}, largest relative difference of loss {loss_gap:.1e} "
          f"and gradient norm {norm_gap:.1e}")


if __name__ == "__main__":
    main()
