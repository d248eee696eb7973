"""Stage 3's step against this machine's matmul peak: achieved model FLOP/s of each phase.

    .venv/bin/python benchmarks/bench_roofline.py [--steps 3] [--direction RUN_DIR] [--dtype auto]
                                                  [--model M] [--prompts SET_OR_FILE] [--bf16]
                                                  [--prompts-per-step P] [--samples-per-prompt M]
                                                  [--micro-batch-size B] [--gradient-checkpointing]

First the peak: ``torch.matmul`` in float32 and bfloat16 on the shapes of the model's own linear
layers (the output head left out), ``--rows`` rows each (about a micro-batch's tokens), the
median of ``--repeats`` runs per shape, the best shape per dtype. Then ``--steps`` optimizer steps
of the default DistillConfig (the batch options above override it) on the embedded default (as
benchmarks/bench_distill.py) or ``--model``, the first left out as warm-up. Any model directory
does, a GPU's too: after ``benchmarks/gpu_check.py --paper-8b --work-dir DIR``, ``--model
DIR/llama-8b-shaped --direction DIR/paper-8b --prompts DIR/prompts.txt --dtype bfloat16`` with
that stage's batch options measures the one-GPU 8B setting offline (on CUDA the peak GPU memory
is printed too).
Each phase is timed by wrapping the trainer's own methods (behaviour unchanged): sampling
(``Distiller.sample``), teacher scoring (``Teachers.logits``), student forward+backward (the rest
of ``Distiller.backward``: loss and step metrics included), and the rest of the step (clipping,
optimizer, schedule). Tokens are counted at the input embedding as the model reads them, padding
and finished rows included, and logit positions at the output head. FLOPs (:func:`forward_flops`)
are 2 x weights x tokens for the body and 2 x head weights x logit positions, x3 for
forward+backward (the usual 6·N·T); attention's score products are left out. With LoRA the frozen
base needs no weight gradients, so the student's useful work is about 4·N·T: its share of the peak
is an upper bound by up to 1.5x. The process keeps freed memory for reuse, as the ``safesteer``
command does (``safesteer.allocator``; ``SAFESTEER_SYSTEM_MALLOC=1`` measures glibc's defaults
instead).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from bench_distill import SAFETY_WORDS, add_int_options, quick_direction
from torch import nn

from safesteer.allocator import bound_kernel_caches, keep_freed_memory
from safesteer.config import ModelArguments
from safesteer.data import load_prompts
from safesteer.direction import Direction
from safesteer.distill.checkpoint import LOG_FILE
from safesteer.distill.config import DistillConfig
from safesteer.distill.trainer import Distiller
from safesteer.models import load_model

PHASES = ("sampling", "teacher scoring", "student fwd+bwd")
TARGET_STUDENT = 0.40  # the student's forward+backward, as a share of the faster dtype's peak


def forward_flops(body_params: int, head_params: int, tokens: int, logit_positions: int) -> float:
    """Multiply-adds x 2 of one forward: every body weight once per token read, the output head's
    once per position whose logits are computed (attention's score products left out)."""
    return 2.0 * (body_params * tokens + head_params * logit_positions)


def synchronize() -> None:
    if torch.accelerator.is_available():
        torch.accelerator.synchronize()


def matmul_gflops(rows: int, inner: int, cols: int, dtype: torch.dtype, device: torch.device,
                  repeats: int) -> float:
    """Median GFLOP/s of ``[rows, inner] @ [inner, cols]`` after one warm-up product."""
    a = torch.randn(rows, inner, dtype=dtype, device=device)
    b = torch.randn(inner, cols, dtype=dtype, device=device)
    torch.matmul(a, b)
    seconds = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        torch.matmul(a, b)
        synchronize()
        seconds.append(time.perf_counter() - start)
    return 2 * rows * inner * cols / statistics.median(seconds) / 1e9


def weight_counts(model: nn.Module) -> tuple[int, int, list[tuple[int, int]]]:
    """(body weights, output-head weights, the body's distinct linear shapes) of the base model;
    the input embedding is a lookup, not a product, and a tied head counts once, as the head."""
    head = model.get_output_embeddings().weight
    embedding = model.get_input_embeddings().weight
    skip = {id(head), id(embedding)}
    body = sum(p.numel() for p in model.parameters() if id(p) not in skip)
    shapes = sorted({(m.in_features, m.out_features) for m in model.modules()
                     if isinstance(m, nn.Linear) and m.weight is not head})
    return body, head.numel(), shapes


class PhaseMeter:
    """Seconds, tokens read and logit positions per (step, phase), from wrapped trainer methods
    and hooks on the input embedding and output head; a phase nested in another (the teacher
    inside ``backward``) is taken out of the outer one's seconds."""

    def __init__(self) -> None:
        self.seconds: dict[tuple[int, str], float] = defaultdict(float)
        self.tokens: dict[tuple[int, str], int] = defaultdict(int)
        self.logits: dict[tuple[int, str], int] = defaultdict(int)
        self.current: tuple[int, str] | None = None

    def wrap(self, owner: Any, name: str, phase: str, step_of: Callable[..., int]) -> None:
        method = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            outer, self.current = self.current, (step_of(*args), phase)
            synchronize()
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                synchronize()
                elapsed = time.perf_counter() - start
                self.seconds[self.current] += elapsed
                if outer is not None:
                    self.seconds[outer] -= elapsed
                self.current = outer

        setattr(owner, name, timed)

    def hook(self, model: nn.Module) -> None:
        def read(_module: nn.Module, args: tuple, _output: torch.Tensor) -> None:
            if self.current is not None:
                self.tokens[self.current] += args[0].numel()

        def projected(_module: nn.Module, _args: tuple, output: torch.Tensor) -> None:
            if self.current is not None:
                self.logits[self.current] += output.shape[:-1].numel()

        model.get_input_embeddings().register_forward_hook(read)
        model.get_output_embeddings().register_forward_hook(projected)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps (the first is warm-up)")
    parser.add_argument("--max-new-tokens", type=int, default=DistillConfig().max_new_tokens)
    parser.add_argument("--dtype", default="auto", help="the model's dtype (auto: float32 on CPU)")
    parser.add_argument("--bf16", action="store_true",
                        help="teacher and student forwards under bfloat16 autocast (DistillConfig.bf16)")
    parser.add_argument("--direction", default=None, help="run directory of `safesteer direction`")
    parser.add_argument("--model", default=ModelArguments.model, help="as `safesteer run --model`")
    parser.add_argument("--prompts", default="safesteer-train", help="training prompts: set or file")
    add_int_options(parser, ("prompts_per_step", "samples_per_prompt", "micro_batch_size"))
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="recompute activations in backward (DistillConfig.gradient_checkpointing)")
    parser.add_argument("--rows", type=int, default=1024, help="rows of each peak matmul")
    parser.add_argument("--repeats", type=int, default=5, help="timed products per shape")
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the first step is warm-up)")

    kept = keep_freed_memory()
    bound_kernel_caches()
    model, tokenizer = load_model(ModelArguments(model=args.model, dtype=args.dtype))
    body, head, shapes = weight_counts(model)
    peaks = {}
    for dtype in (torch.float32, torch.bfloat16):
        rates = {shape: matmul_gflops(args.rows, *shape, dtype, model.device, args.repeats)
                 for shape in shapes}
        best = max(rates, key=rates.__getitem__)
        peaks[str(dtype).removeprefix("torch.")] = (rates[best], best)
    peak_dtype = max(peaks, key=lambda name: peaks[name][0])
    peak = peaks[peak_dtype][0]

    direction = Direction.load(args.direction) if args.direction else quick_direction(model, tokenizer)
    safety_ids = sorted({tokenizer.encode(word, add_special_tokens=False)[0] for word in SAFETY_WORDS})
    config = DistillConfig(max_new_tokens=args.max_new_tokens, save_steps=0, bf16=args.bf16,
                           prompts_per_step=args.prompts_per_step, samples_per_prompt=args.samples_per_prompt,
                           micro_batch_size=args.micro_batch_size,
                           gradient_checkpointing=args.gradient_checkpointing)
    prompts = load_prompts(args.prompts, limit=args.steps * config.prompts_per_step)
    meter = PhaseMeter()
    with tempfile.TemporaryDirectory() as output_dir:
        distiller = Distiller(model, tokenizer, direction, prompts, config, output_dir,
                              safety_token_ids=safety_ids)
        distiller.setup()
        meter.hook(distiller.student)
        meter.wrap(distiller, "sample", PHASES[0], lambda step: step)
        meter.wrap(distiller.teachers, "logits", PHASES[1], lambda rollout, *_: rollout.step)
        meter.wrap(distiller, "backward", PHASES[2], lambda rollout: rollout.step)
        distiller.train()
        log = [json.loads(line) for line in (Path(output_dir) / LOG_FILE).read_text().splitlines()]

    measured = range(2, args.steps + 1)
    step_seconds = sum(log[step - 1]["seconds"] for step in measured)
    print(f"matmul peak ({torch.get_num_threads()} threads, {args.rows} rows x the model's linear shapes, "
          f"median of {args.repeats}): " + ", ".join(
              f"{name} {rate:.1f} GFLOP/s ({args.rows}x{shape[0]} @ {shape[0]}x{shape[1]})"
              for name, (rate, shape) in peaks.items()) + f"; peak = {peak_dtype}")
    print(f"{model.name_or_path} {str(model.dtype).removeprefix('torch.')}"
          f"{' (bfloat16 autocast)' if config.bf16 else ''}, {body / 1e6:.1f}M body + "
          f"{head / 1e6:.1f}M head weights; {len(measured)} step(s) after a warm-up step, "
          f"{config.prompts_per_step} prompts x {config.samples_per_prompt} samples x <= "
          f"{config.max_new_tokens} new tokens, micro-batch {config.micro_batch_size}"
          f"{', activations recomputed' if config.gradient_checkpointing else ''}, LoRA r={config.lora_r}; "
          f"tokens include padding; freed memory "
          f"{'kept for reuse' if kept else 'as glibc defaults'}"
          + (f"; peak GPU memory {torch.cuda.max_memory_allocated() / 2**20:,.0f} MiB"
             if model.device.type == "cuda" else ""))
    print(f"{'phase':<17} {'share':>6} {'s/step':>7} {'tokens':>8} {'logits':>7} {'GFLOP':>7} "
          f"{'GFLOP/s':>8} {'% peak':>7}")
    accounted, shares = 0.0, {}
    for phase in PHASES:
        seconds = sum(meter.seconds[(step, phase)] for step in measured)
        tokens = sum(meter.tokens[(step, phase)] for step in measured)
        logits = sum(meter.logits[(step, phase)] for step in measured)
        flops = forward_flops(body, head, tokens, logits) * (3 if phase == PHASES[2] else 1)
        accounted += seconds
        shares[phase] = flops / seconds / 1e9 / peak
        print(f"{phase:<17} {seconds / step_seconds:6.1%} {seconds / len(measured):7.2f} "
              f"{tokens // len(measured):8d} {logits // len(measured):7d} {flops / len(measured) / 1e9:7.1f} "
              f"{flops / seconds / 1e9:8.2f} {shares[phase]:7.1%}")
    rest = step_seconds - accounted
    print(f"{'rest (optimizer)':<17} {rest / step_seconds:6.1%} {rest / len(measured):7.2f}")
    print(f"{'step':<17} {1:6.1%} {step_seconds / len(measured):7.2f}")
    student = shares[PHASES[2]]
    print(f"bench_roofline: student fwd+bwd at {student:.0%} of the {peak_dtype} matmul peak (target >= "
          f"{TARGET_STUDENT:.0%}: {'met' if student >= TARGET_STUDENT else 'NOT met'}); sampling at "
          f"{shares[PHASES[0]]:.0%}, teacher scoring at {shares[PHASES[1]]:.0%}")


if __name__ == "__main__":
    main()
