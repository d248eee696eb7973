"""Stage 3 against TRL's on-policy distillation, same run: seconds per optimizer step and peak RSS.

    .venv/bin/pip install -e ".[bench]"     # TRL, only for this script
    .venv/bin/python benchmarks/bench_step.py [--steps 5] [--rounds 2] [--direction RUN_DIR] [--bf16]
                                              [--dtype bfloat16] [--gradient-checkpointing] [--same-allocator]
                                              [--make-up-every SECONDS]

Both sides train the embedded default (float32, or ``--dtype bfloat16`` weights, what ``--dtype
auto`` gives on a GPU) on the same ``safesteer-train`` prompts, in the
same order and to the same token ids, with the default DistillConfig's sampling, LoRA and
optimiser settings (each overridable below): P prompts x M samples per optimizer step in
micro-batches of the same size, the same completion length, temperature 1, no checkpoints saved.
safesteer is the ``Distiller``: one copy of the weights (the teacher is the adapter switched off
plus the steering hook) and reverse KL on the safety tokens S. TRL is its ``DistillationTrainer``
(always on-policy: the student samples every completion) with reverse KL on the whole vocabulary;
its teacher is what a TRL user must build, a second copy of the model carrying the same steering
hook, and each prompt is repeated M times in its dataset, since it samples one completion per
row. Each side runs in a fresh process, so its peak RSS (VmHWM) is its own, and the sides take
``--rounds`` turns (ours, TRL, ours, TRL, ...), so that a drift of the machine's speed during
the run hits both. s/step runs from the step's sampling to its optimizer step, the median over
every round's steps but its first (warm-up). The sides sample different completions, whose mean
lengths are printed: the work per step is comparable only when they are close. safesteer's
process keeps freed memory for reuse and bounds oneDNN's kernel caches, as the ``safesteer``
command does (``safesteer.allocator``, docs/method.md §6.1); TRL's keeps glibc's and oneDNN's
defaults, as a TRL user's script would, unless ``--same-allocator`` gives it both settings too;
``SAFESTEER_SYSTEM_MALLOC=1`` in the environment leaves both sides on glibc's defaults, and an
allocator in ``LD_PRELOAD`` (jemalloc) serves both.
Timings on a shared machine vary: compare the ratios of one run. ``--bf16`` runs both sides in
bfloat16 products over the float32 weights, the dtype TRL trains in by default: TRL's
``bf16=True`` (accelerate's autocast over every forward, sampling included), and ours ``--bf16
--generation-dtype bfloat16`` (docs/method.md §6.1). With ``--dtype bfloat16`` both sides hold
the frozen weights (TRL: both copies) in bfloat16 and train a float32 LoRA adapter on them (peft
upcasts adapters), sampling in the weights' own products.
``--gradient-checkpointing`` has both sides recompute each layer's activations in backward
(TRL's default too; ours then reads each prompt once per row, as the cache it shares a prompt
through is off under checkpointing).
The peak (VmHWM) does not say what it holds, so each side also samples its resident set every
``--make-up-every`` seconds (20 ms; 0 for none) and prints the make-up of the highest sample:
anonymous memory (heap, tensors) and file-backed pages (libraries, and the float32 weights,
which transformers maps from their safetensors file; TRL's two copies map it twice).
File-backed pages are clean, so the kernel may drop them when memory runs short and read them in
again.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import multiprocessing
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench_distill import SAFETY_WORDS, add_int_options, quick_direction

from safesteer.allocator import bound_kernel_caches, keep_freed_memory
from safesteer.config import ModelArguments
from safesteer.data import load_prompts
from safesteer.direction import Direction
from safesteer.distill.checkpoint import LOG_FILE
from safesteer.distill.config import DistillConfig
from safesteer.distill.trainer import Distiller
from safesteer.models import load_model, render_prompts

TRL_SPEC = "trl==1.16.0"
PROMPT_SET = "safesteer-train"
TARGET_SPEEDUP, TARGET_RSS = 2.0, 0.5


def status_mib() -> dict[str, float]:
    """This process's sizes in /proc/self/status (VmHWM, VmRSS, RssAnon, ...), MiB, read at once;
    empty without procfs."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return {}
    fields = (line.split(":", 1) for line in lines if line.endswith(" kB"))
    return {name: int(value.split()[0]) / 1024 for name, value in fields}


def memory_mib(field: str = "VmHWM") -> float:
    """This process's peak (VmHWM) or current (VmRSS) resident set. The peak starts afresh at
    exec; ``ru_maxrss`` would not, as the fork before the exec carries the parent's set in."""
    return status_mib().get(field) or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class PeakMakeUp(threading.Thread):
    """Samples the resident set every ``interval`` seconds (none at 0, or without procfs) and
    keeps the make-up (VmRSS, RssAnon, RssFile, MiB; RssShmem left out) of the highest sample,
    which may miss a peak shorter than the interval."""

    def __init__(self, interval: float) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.highest: dict[str, float] | None = None
        self.running = True
        if interval > 0:
            self.start()

    def run(self) -> None:
        while self.running and (sample := status_mib()):
            if self.highest is None or sample["VmRSS"] > self.highest["VmRSS"]:
                self.highest = {field: sample[field] for field in ("VmRSS", "RssAnon", "RssFile")}
            time.sleep(self.interval)

    def stop(self) -> dict[str, float] | None:
        self.running = False
        if self.is_alive():
            self.join()
        return self.highest


def allocator_in_use(kept: bool) -> str:
    """How this process allocates: glibc keeping freed memory, another allocator in LD_PRELOAD
    (which ``keep_freed_memory`` leaves alone), or glibc's defaults."""
    if kept:
        return "freed memory kept for reuse"
    preloaded = os.environ.get("LD_PRELOAD")
    return f"{Path(preloaded).name} preloaded" if preloaded else "freed memory as glibc defaults"


def distill_config(args: argparse.Namespace) -> DistillConfig:
    return DistillConfig(prompts_per_step=args.prompts_per_step, samples_per_prompt=args.samples_per_prompt,
                         micro_batch_size=args.micro_batch_size, max_new_tokens=args.max_new_tokens,
                         learning_rate=args.learning_rate, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
                         lora_target_modules=args.lora_target_modules, save_steps=0, seed=args.seed,
                         bf16=args.bf16, gradient_checkpointing=args.gradient_checkpointing)


def load_side(args: argparse.Namespace):
    """The embedded model in --dtype, its tokenizer and the step's prompts (one epoch of
    ``--steps``); with --bf16 it generates in bfloat16 products (TRL's autocast does that for its
    side)."""
    model, tokenizer = load_model(ModelArguments(model=args.model, dtype=args.dtype,
                                                 generation_dtype="bfloat16" if args.bf16 else "model"))
    return model, tokenizer, load_prompts(PROMPT_SET, limit=args.steps * args.prompts_per_step)


def run_safesteer(args: argparse.Namespace, direction_dir: str) -> dict[str, Any]:
    """safesteer's steps in this (fresh) process, which sets the heap as the command does;
    returns the prompt order TRL is to follow."""
    allocator = allocator_in_use(keep_freed_memory())
    bound_kernel_caches()
    imported = memory_mib("VmRSS")
    make_up = PeakMakeUp(args.make_up_every)
    model, tokenizer, prompts = load_side(args)
    safety_ids = sorted({tokenizer.encode(word, add_special_tokens=False)[0] for word in SAFETY_WORDS})
    with tempfile.TemporaryDirectory() as output_dir:
        distiller = Distiller(model, tokenizer, Direction.load(direction_dir), prompts, distill_config(args),
                              output_dir, safety_token_ids=safety_ids)
        distiller.setup()
        order = [distiller.step_prompt_indices(step) for step in range(1, args.steps + 1)]
        distiller.train()
        log = [json.loads(line) for line in (Path(output_dir) / LOG_FILE).read_text().splitlines()]
    return {"seconds": [row["seconds"] for row in log], "order": order, "rss_mib": memory_mib(),
            "imported_mib": imported, "make_up": make_up.stop(), "allocator": allocator,
            "completion_length": [row["completion_length"] for row in log],
            "loss": f"subset reverse KL on |S| = {len(safety_ids)} tokens"}


def run_trl(args: argparse.Namespace, direction_dir: str, order: list[list[int]]) -> dict[str, Any]:
    """TRL's DistillationTrainer on the same prompts in the same order, in this (fresh) process."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import PrinterCallback, TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    class StepTimer(TrainerCallback):
        """Seconds from each optimizer step's start (before its sampling) to its end."""

        def __init__(self) -> None:
            self.seconds: list[float] = []

        def on_step_begin(self, *_: Any, **__: Any) -> None:
            self.started = time.perf_counter()

        def on_step_end(self, *_: Any, **__: Any) -> None:
            self.seconds.append(time.perf_counter() - self.started)

    allocator = allocator_in_use(args.same_allocator and keep_freed_memory())
    if args.same_allocator:
        bound_kernel_caches()
    imported = memory_mib("VmRSS")
    make_up = PeakMakeUp(args.make_up_every)
    student, tokenizer, prompts = load_side(args)
    teacher, _ = load_model(ModelArguments(model=args.model, dtype=args.dtype))  # the second copy
    config = distill_config(args)
    rendered = render_prompts(tokenizer, prompts)
    rows = [rendered[index] for step in order for index in step for _ in range(config.samples_per_prompt)]
    step_rows = config.prompts_per_step * config.samples_per_prompt
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as output_dir:
        trl_args = DistillationConfig(
            output_dir=output_dir, max_steps=args.steps, per_device_train_batch_size=config.micro_batch_size,
            gradient_accumulation_steps=step_rows // config.micro_batch_size,
            learning_rate=config.learning_rate, lr_scheduler_type="cosine", warmup_steps=config.warmup_ratio,
            max_grad_norm=config.max_grad_norm, weight_decay=config.weight_decay,
            # TRL's beta selects the divergence of its generalised JSD: "0.0 = forward KL, 0.5 = JSD,
            # 1.0 = reverse KL" (DistillationConfig.beta's help, trl 1.16.0), over the whole vocabulary.
            beta=1.0, temperature=config.temperature, top_p=config.top_p, top_k=0,
            max_completion_length=config.max_new_tokens,
            # TRL's defaults differ from ours here: it checkpoints activations and trains in bf16.
            gradient_checkpointing=config.gradient_checkpointing, bf16=config.bf16,
            shuffle_dataset=False, save_strategy="no", report_to="none", logging_steps=1,
            disable_tqdm=True, seed=config.seed, use_cpu=student.device.type == "cpu")
        lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                          target_modules=config.target_modules(), task_type="CAUSAL_LM")
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=trl_args,
                                      train_dataset=Dataset.from_dict({"prompt": rows}),
                                      processing_class=tokenizer, peft_config=lora, callbacks=[timer])
        trainer.remove_callback(PrinterCallback)  # its per-step dicts; the summary follows
        with Direction.load(direction_dir).steer(teacher):
            trainer.train()
    lengths = [row["completions/mean_length"] for row in trainer.state.log_history
               if "completions/mean_length" in row]
    return {"seconds": timer.seconds, "rss_mib": memory_mib(), "imported_mib": imported,
            "make_up": make_up.stop(), "allocator": allocator, "completion_length": lengths,
            "loss": "generalised JSD with beta 1 (reverse KL) on the full vocabulary"}


def in_fresh_process(function, *arguments: Any) -> dict[str, Any]:
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(function, arguments)


def combined(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One side's rounds as one result: each round's steps after its warm-up step, the highest
    peak RSS and the make-up of the highest sample, all completion lengths."""
    return {"seconds": [seconds for result in rounds for seconds in result["seconds"][1:]],
            "rss_mib": max(result["rss_mib"] for result in rounds),
            "imported_mib": max(result["imported_mib"] for result in rounds),
            "make_up": max((result["make_up"] for result in rounds if result["make_up"]),
                           key=lambda make_up: make_up["VmRSS"], default=None),
            "completion_length": [length for result in rounds for length in result["completion_length"]],
            "loss": rounds[0]["loss"], "allocator": rounds[0]["allocator"]}


def summary(name: str, result: dict[str, Any]) -> float:
    """Print one side's figures; returns its median s/step over the timed steps."""
    median, make_up = statistics.median(result["seconds"]), result["make_up"]
    make_up_text = "" if make_up is None else (
        f"; highest sample {make_up['VmRSS']:.0f}: {make_up['RssAnon']:.0f} anonymous, "
        f"{make_up['RssFile']:.0f} file-backed")
    steps = " ".join(f"{seconds:.2f}" for seconds in result["seconds"])
    print(f"{name:<36} {median:7.2f} s/step (timed steps: {steps}), "
          f"peak RSS {result['rss_mib']:.0f} MiB ({result['imported_mib']:.0f} once its libraries were "
          f"imported{make_up_text}), completion length "
          f"{statistics.mean(result['completion_length']):.1f} tokens; {result['loss']}; "
          f"{result['allocator']}")
    return median


def main() -> None:
    defaults = DistillConfig()
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5,
                        help="optimizer steps per side (the first is warm-up)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="rounds of both sides, in turns (each round's first step is warm-up)")
    parser.add_argument("--direction", default=None,
                        help="run directory of `safesteer direction`; default: a quick response-contrast "
                             "direction (bench_distill.quick_direction)")
    parser.add_argument("--model", default=ModelArguments().model)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    add_int_options(parser, ("prompts_per_step", "samples_per_prompt", "micro_batch_size", "max_new_tokens",
                             "lora_r", "lora_alpha"))
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    parser.add_argument("--lora-target-modules", default=defaults.lora_target_modules)
    parser.add_argument("--same-allocator", action="store_true",
                        help="TRL's process keeps freed memory for reuse and bounds oneDNN's kernel caches "
                             "too (safesteer.allocator)")
    parser.add_argument("--bf16", action="store_true",
                        help="both sides in bfloat16 products over float32 weights (TRL's default)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="the weights' dtype on both sides (bfloat16: a float32 adapter on them)")
    parser.add_argument("--make-up-every", type=float, default=0.02,
                        help="seconds between the samples of each side's resident set (0: none)")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="both sides recompute activations in backward (TRL's default)")
    args = parser.parse_args()
    if args.steps < 2 or args.rounds < 1:
        parser.error("--steps must be at least 2 (the first step is warm-up), --rounds at least 1")
    if (args.prompts_per_step * args.samples_per_prompt) % args.micro_batch_size:
        parser.error("--prompts-per-step x --samples-per-prompt must be a multiple of --micro-batch-size "
                     "(TRL accumulates whole micro-batches)")
    try:
        from trl import DistillationTrainer  # noqa: F401  (each side imports its own)
    except ImportError as error:
        sys.exit(f"bench_step: error: TRL's DistillationTrainer cannot be imported ({error}); "
                 f"pip install -e '.[bench]' installs {TRL_SPEC}")
    trl_version = importlib.metadata.version("trl")

    with tempfile.TemporaryDirectory() as direction_dir:
        if args.direction:
            direction_source = f"the direction of {args.direction}"
            Direction.load(args.direction).save(Path(direction_dir))
        else:
            direction_source = "a quick response-contrast direction (layer 16, beta 0.2, 16 prompts)"
            model, tokenizer = load_model(ModelArguments(model=args.model, dtype="float32"))
            quick_direction(model, tokenizer).save(Path(direction_dir))
            del model
        rounds: list[tuple[dict[str, Any], dict[str, Any]]] = []
        for _ in range(args.rounds):  # in turns, so that a drift of the machine's speed hits both
            ours_round = in_fresh_process(run_safesteer, args, direction_dir)
            rounds.append((ours_round, in_fresh_process(run_trl, args, direction_dir, ours_round["order"])))
        ours, theirs = (combined([pair[side] for pair in rounds]) for side in (0, 1))

    config = distill_config(args)
    precision = f"{args.dtype}, bfloat16 products" if args.bf16 else args.dtype
    precision += ", activations recomputed in backward" if args.gradient_checkpointing else ""
    print(f"trl {trl_version}; {args.rounds} round(s) of each side in turns; {args.model} {precision} with "
          f"LoRA r={config.lora_r} alpha={config.lora_alpha} "
          f"({config.lora_target_modules}); {args.steps} steps of {config.prompts_per_step} {PROMPT_SET} "
          f"prompts x {config.samples_per_prompt} samples x <= {config.max_new_tokens} new tokens, "
          f"micro-batch {config.micro_batch_size}, lr {config.learning_rate:g}; teacher steered by "
          f"{direction_source}")
    ours_seconds = summary("safesteer Distiller", ours)
    theirs_seconds = summary(f"trl {trl_version} DistillationTrainer", theirs)
    speedup, rss = theirs_seconds / ours_seconds, ours["rss_mib"] / theirs["rss_mib"]
    met = {True: "met", False: "NOT met"}
    print(f"ratios: trl/safesteer s/step {speedup:.2f} (target >= {TARGET_SPEEDUP:g}: "
          f"{met[speedup >= TARGET_SPEEDUP]}), safesteer/trl peak RSS {rss:.2f} (target <= {TARGET_RSS:g}: "
          f"{met[rss <= TARGET_RSS]}); above the imported libraries "
          f"{(ours['rss_mib'] - ours['imported_mib']) / (theirs['rss_mib'] - theirs['imported_mib']):.2f}"
          + ("" if not (ours["make_up"] and theirs["make_up"]) else
             f", anonymous memory at the highest samples "
             f"{ours['make_up']['RssAnon'] / theirs['make_up']['RssAnon']:.2f}"))
    print(f"bench_step: safesteer {speedup:.1f}x faster, {rss:.2f}x peak RSS vs trl {trl_version} "
          "DistillationTrainer")


if __name__ == "__main__":
    main()
