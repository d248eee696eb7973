"""``safesteer run``: the whole method, top-down, with every stage's artifact in one run directory.

1. Safety teacher: a refusal direction and its steering (``direction.json``).
2. Safety tokens: the vote over steered rollouts (``safety_tokens.json``).
3. Localized on-policy distillation of a LoRA student (``student/``, ``checkpoints/``).
4. A quick before/after refusal check of base, teacher and student (``check.json``).

With ``--resume`` a finished stage is loaded from disk instead of recomputed, after checking that
it was made with the same settings; training continues from its last complete checkpoint.
"""

from __future__ import annotations

import logging
import resource
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from accelerate import Accelerator

from safesteer.config import DataArguments, ModelArguments
from safesteer.direction import Direction, DirectionConfig, find_direction
from safesteer.distill.config import DistillConfig
from safesteer.distill.trainer import Distiller, make_accelerator
from safesteer.errors import SafesteerError
from safesteer.evaluate import refusal_check, refusal_table
from safesteer.io import RUN_KIND, check_output_dir, claim_output_dir, differing_settings, write_json
from safesteer.models import load_model, model_device, model_id, model_type
from safesteer.tokens import SafetyTokenSet, TokensConfig, select_safety_tokens

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class RunArguments:
    """The run directory, the training prompts and the closing refusal check."""

    output_dir: str = field(metadata={"help": "Run directory: every stage's artifacts go here."})
    train_prompts: str = field(default="safesteer-train",
                               metadata={"help": "Harmful training prompts (registry name or file; "
                                                 "comma-separated sets are interleaved)."})
    n_train_prompts: int = field(default=100, metadata={"help": "Use at most this many training prompts."})
    retain_prompts: str | None = field(
        default=None, metadata={
            "help": "Benign prompts mixed into training, taught by the unsteered model (or, with "
                    "--conditional-teacher, by whatever the gate decides), so the student also "
                    "learns where not to refuse. This uses general data, which the paper does not; "
                    "direction-harmless-train is the set stage 1 already uses, borderline-train the "
                    "project's borderline prompts; comma-separated sets are interleaved."})
    n_retain_prompts: int = field(default=0, metadata={"help": "Use this many --retain-prompts."})
    resume: bool = field(default=False, metadata={
        "help": "Continue a run in --output-dir: reuse finished stages, resume training from its last "
                "checkpoint."})
    overwrite: bool = field(default=False, metadata={
        "help": "Start afresh in a directory holding a run: its whole contents are removed first (only "
                "a safesteer run directory is replaced; any other non-empty directory is refused)."})
    check_harmful: list[str] = field(
        default_factory=lambda: ["harmbench-test", "jbb", "donotanswer-test"],
        metadata={"help": "Held-out harmful prompt sets for the before/after refusal check "
                          "(instruction-style HarmBench and JBB, question-style Do-Not-Answer)."})
    check_benign: list[str] = field(
        default_factory=lambda: ["ordinary-test", "borderline-test"],
        metadata={"help": "Held-out benign prompt sets for the before/after refusal check; the "
                          "check also reports each model's worst of them."})
    check_limit: int = field(default=50, metadata={"help": "Prompts per check set (0 skips the check)."})
    check_max_new_tokens: int = field(default=64, metadata={
        "help": "Tokens generated per check answer; the keyword judge reads the first 200 characters, "
                "so shorter answers hide refusals that follow a helpful opening."})

    def __post_init__(self) -> None:
        if self.resume and self.overwrite:
            raise SafesteerError("--resume and --overwrite exclude each other")
        if (self.n_train_prompts < 1 or self.check_limit < 0 or self.check_max_new_tokens < 1
                or self.n_retain_prompts < 0):
            raise SafesteerError("--n-train-prompts and --check-max-new-tokens must be >= 1, "
                                 "--check-limit and --n-retain-prompts >= 0")
        if (self.n_retain_prompts > 0) != (self.retain_prompts is not None):
            raise SafesteerError("--retain-prompts and --n-retain-prompts > 0 go together")


def _check_run_dir(run: RunArguments) -> Path:
    """The run directory, if --output-dir may hold this run: refused when it holds a run and neither
    --resume nor --overwrite says what to do with it, when --resume finds no run there (a mistyped
    path), and when it is anything but a run directory (see :func:`safesteer.io.check_output_dir`)."""
    return check_output_dir(Path(run.output_dir), RUN_KIND, overwrite=run.overwrite, resume=run.resume)


def _same_settings(stage: str, saved: dict[str, Any], current: dict[str, Any]) -> None:
    differing = differing_settings(saved, current)
    if differing:
        raise SafesteerError(f"cannot resume: the saved {stage} was made with other settings "
                             f"({'; '.join(differing)}); use --overwrite or the original settings")


def teacher_direction(model: Any, tokenizer: Any, output_dir: Path, resume: bool,
                      config: DirectionConfig, data: DataArguments, name: str) -> Direction:
    """Stage 1: the direction that turns the base model into the safety teacher, saved in
    ``output_dir`` (or, with ``resume``, loaded from there when it was made with ``config``)."""
    if resume and (output_dir / "direction.json").exists():
        direction = Direction.load(output_dir)
        _same_settings("direction", direction.metadata.get("config", {}), asdict(config))
        direction.check_compatible(model)
        return direction
    direction = find_direction(model, tokenizer, config, data, name)
    direction.save(output_dir)
    return direction


def safety_tokens(model: Any, tokenizer: Any, direction: Direction, output_dir: Path, resume: bool,
                  config: TokensConfig, data: DataArguments) -> SafetyTokenSet:
    """Stage 2: the tokens the distillation loss is restricted to, saved in ``output_dir`` (or, with
    ``resume``, loaded from there when made with ``config`` and ``direction``)."""
    if resume and (output_dir / "safety_tokens.json").exists():
        tokens = SafetyTokenSet.load(output_dir)
        _same_settings("safety tokens", tokens.settings,
                       {**asdict(config), "direction_layer": direction.layer,
                        "direction_coefficient": direction.coefficient})
        return tokens
    prompts = data.load(config.vote_prompts, config.vote_n_prompts)
    tokens = select_safety_tokens(model, tokenizer, direction, prompts, config)
    tokens.save(output_dir)
    return tokens


def _on_main_process(state: Accelerator, make: Callable[[], T], load: Callable[[], T]) -> T:
    """Run a stage once, on the main process; under ``accelerate launch`` the others wait for it
    and then read its artifact, so every process trains with the same direction and tokens."""
    result = make() if state.is_main_process else None
    state.wait_for_everyone()
    return result if result is not None else load()


class _Laps:
    """Wall seconds of each stage: ``laps("name")`` records the time since the previous call."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def __call__(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = round(now - self._last, 1)
        self._last = now


def run_pipeline(model_args: ModelArguments, data_args: DataArguments, run: RunArguments,
                 direction_config: DirectionConfig, tokens_config: TokensConfig,
                 distill_config: DistillConfig) -> dict[str, Any]:
    """Direction, safety tokens, distillation and the before/after check, in that order.

    Under ``accelerate launch`` stages 1, 2 and the check run on the main process only; every
    process trains its share of each step.
    """
    output_dir = _check_run_dir(run)
    state = make_accelerator(distill_config, output_dir)  # before loading: "cuda" = this process's GPU
    state.wait_for_everyone()  # every process checks the directory before the main one writes
    laps = _Laps()
    model, tokenizer = load_model(model_args)
    laps("load")
    if state.is_main_process:  # the old run goes before any stage writes (the others wait in stage 1)
        claim_output_dir(output_dir, RUN_KIND, overwrite=run.overwrite)
    direction = _on_main_process(
        state, lambda: teacher_direction(model, tokenizer, output_dir, run.resume, direction_config,
                                         data_args, model_id(model_args)),
        lambda: Direction.load(output_dir))
    laps("direction")
    print(f"teacher: {direction.metadata['method']} direction at layer {direction.layer}, "
          f"coefficient {direction.coefficient:.4g}")
    tokens = _on_main_process(
        state, lambda: safety_tokens(model, tokenizer, direction, output_dir, run.resume, tokens_config,
                                     data_args),
        lambda: SafetyTokenSet.load(output_dir))
    laps("tokens")
    print(f"safety tokens ({len(tokens.ids)}): {' '.join(repr(text) for text in tokens.strings[:20])} ...")

    harmful = data_args.load(run.train_prompts, run.n_train_prompts)
    retain = data_args.load(run.retain_prompts, run.n_retain_prompts) if run.retain_prompts else []
    distiller = Distiller(model, tokenizer, direction, harmful + retain, distill_config, output_dir,
                          safety_token_ids=tokens.ids,
                          steer_prompts=[True] * len(harmful) + [False] * len(retain),
                          resume=run.resume, overwrite=run.overwrite, accelerator=state)
    distiller.setup()
    result = distiller.train()
    laps("train")
    print(f"student: {result.student_dir} after {result.step} steps")
    if not state.is_main_process:
        return {"stage_seconds": laps.seconds}
    summary: dict[str, Any] = {}
    if run.check_limit > 0:
        targets = {"base": distiller.teachers.base, "teacher": distiller.teachers.teacher,
                   "student": lambda: nullcontext(distiller.model.eval())}
        prompt_sets = {name: data_args.load(name, run.check_limit)
                       for name in [*run.check_harmful, *run.check_benign]}
        results = refusal_check(tokenizer, targets, prompt_sets,
                                max_new_tokens=run.check_max_new_tokens,
                                batch_size=direction_config.batch_size)
        laps("check")
        summary = {"refusal": results, "harmful_sets": run.check_harmful,
                   "benign_sets": run.check_benign, "judge": "keyword (safesteer.judge)",
                   "max_new_tokens": run.check_max_new_tokens}
        print(f"\nrefusal rate (keyword judge on the first 200 characters of greedy "
              f"{run.check_max_new_tokens}-token answers):\n" + refusal_table(results, run.check_benign))
    summary.update(stage_seconds=laps.seconds, **peak_memory_mib(model_device(model)))
    write_json(output_dir / "check.json", summary)
    print("wall time: " + ", ".join(f"{stage} {seconds:.0f} s" for stage, seconds in laps.seconds.items())
          + f"; total {sum(laps.seconds.values()):.0f} s")
    return summary


def peak_memory_mib(device: torch.device) -> dict[str, float | None]:
    """This process's peak resident memory and, on CUDA, peak allocated GPU memory, in MiB."""
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    peak_gpu = round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None
    return {"peak_rss_mib": round(peak_rss, 1), "peak_gpu_mib": peak_gpu}


PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "demo": (
        "the embedded SmolLM2-135M on a 2-core CPU in under 10 minutes (LoRA, 32-token samples, "
        "--p-min 1e-3 --inner-top-k 20 --complement, chosen on the validation sets)",
        {"model": "smollm2-135m", "n_train": 64, "n_val": 16, "response_n_val": 12,
         "vote_n_prompts": 16, "vote_samples_per_prompt": 4, "p_min": 1e-3, "inner_top_k": 20,
         "samples_per_prompt": 4, "max_new_tokens": 32, "complement": True, "check_limit": 40},
    ),
    "paper": (
        "the paper's hyperparameters (100 prompts, 8 samples, 512 tokens, K = 50, full fine-tune, "
        "per-completion loss mean) with the learning rate, horizon and p_min of --model's family "
        "(docs/method.md §7: Llama 1e-6 / 5 / 1e-7, Qwen 1e-5 / 7 / 1e-8; Qwen's for other families)",
        {"n_train_prompts": 100, "samples_per_prompt": 8, "max_new_tokens": 512,
         "prompts_per_step": 4, "num_safety_tokens": 50, "vote_samples_per_prompt": 8,
         "horizon": 7, "learning_rate": 1e-5, "use_lora": False, "reduction": "sequence",
         "micro_batch_size": 1, "gradient_checkpointing": True},
    ),
}

# docs/method.md §7: the paper's per-family settings, keyed by the prefix of the config's model_type.
PAPER_FAMILIES: dict[str, dict[str, Any]] = {
    "llama": {"learning_rate": 1e-6, "horizon": 5, "p_min": 1e-7},
    "qwen": {"learning_rate": 1e-5, "horizon": 7, "p_min": 1e-8},
}


def preset_defaults(name: str, model: str) -> dict[str, Any]:
    """The option defaults of preset ``name``; for ``paper``, completed with --model's family."""
    defaults = dict(PRESETS[name][1])
    if name == "paper":
        kind = model_type(model) or ""
        family = next((prefix for prefix in PAPER_FAMILIES if kind.startswith(prefix)), None)
        if family is None:
            logger.warning("--preset paper: no per-family settings for model type %r; using Qwen's "
                           "(learning rate 1e-5, horizon 7, p_min 1e-8). Set --learning-rate, "
                           "--horizon and --p-min to override", kind or "unknown")
            family = "qwen"
        defaults.update(PAPER_FAMILIES[family])
    return defaults
