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
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

from accelerate import Accelerator

from safesteer.config import DataArguments, ModelArguments
from safesteer.direction.artifact import Direction
from safesteer.direction.find import find_direction
from safesteer.direction_config import DirectionConfig
from safesteer.distill.config import DistillConfig
from safesteer.distill.engine import make_accelerator
from safesteer.distill.trainer import Distiller
from safesteer.errors import SafesteerError
from safesteer.evaluate.check import refusal_check, refusal_table
from safesteer.htmlreport.command import report_hint
from safesteer.io import RUN_KIND, check_output_dir, claim_output_dir, differing_settings, write_json
from safesteer.models.devices import peak_memory_mib
from safesteer.models.layout import model_device, num_layers
from safesteer.models.loading import FoldedAdapters, check_model_arguments, load_model, model_id
from safesteer.models.precision import generation_dtype_name
from safesteer.run_config import RunArguments
from safesteer.software import software
from safesteer.tokens.artifact import SafetyTokenSet
from safesteer.tokens.selection import select_safety_tokens
from safesteer.tokens_config import TokensConfig
from safesteer.validation import check_layers

logger = logging.getLogger(__name__)

T = TypeVar("T")


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
    check_model_arguments(model_args)
    data_args.check(*direction_config.prompt_sets(), tokens_config.vote_prompts, *run.prompt_sets())
    state = make_accelerator(distill_config, output_dir)  # before loading: "cuda" = this process's GPU
    state.wait_for_everyone()  # every process checks the directory before the main one writes
    laps = _Laps()
    model, tokenizer = load_model(model_args)
    check_layers("response_layers", direction_config.response_layers, num_layers(model))
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
    retain = (data_args.load(run.retain_prompts, run.n_retain_prompts)
              if run.retain_prompts and run.n_retain_prompts else [])
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
    if run.check_limit > 0 and distiller.run.sharded:
        logger.warning("closing check skipped: under FSDP or DeepSpeed no process holds the whole "
                       "student; evaluate %s with `safesteer eval`", result.student_dir)
    elif run.check_limit > 0:
        targets = {"base": distiller.teachers.base, "teacher": distiller.teachers.teacher,
                   "student": FoldedAdapters(distiller.student.eval())}
        prompt_sets = {name: data_args.load(name, run.check_limit)
                       for name in [*run.check_harmful, *run.check_benign]}
        results = refusal_check(tokenizer, targets, prompt_sets,
                                max_new_tokens=run.check_max_new_tokens,
                                batch_size=direction_config.batch_size)
        laps("check")
        summary = {"refusal": results, "harmful_sets": run.check_harmful,
                   "benign_sets": run.check_benign, "judge": "keyword (safesteer.keyword_judge)",
                   "max_new_tokens": run.check_max_new_tokens,
                   "generation_dtype": generation_dtype_name(model), "bf16_autocast": distiller.bf16}
        print(f"\nrefusal rate (keyword judge on the first 200 characters of greedy "
              f"{run.check_max_new_tokens}-token answers):\n" + refusal_table(results, run.check_benign))
    summary.update(stage_seconds=laps.seconds, **peak_memory_mib(model_device(model)), software=software())
    write_json(output_dir / "check.json", summary)
    print("wall time: " + ", ".join(f"{stage} {seconds:.0f} s" for stage, seconds in laps.seconds.items())
          + f"; total {sum(laps.seconds.values()):.0f} s")
    print(report_hint(output_dir))
    return summary
