"""The single-stage commands: ``direction``, ``tokens``, ``export`` and ``eval``.

Each checks everything it can before the first forward pass, in this order: the output location
(must be creatable, writable and of the right kind), ``--model`` and ``--device``, every prompt
set or file it will read, then, once the model's config is read, the layer indices. A mistake
therefore costs seconds and leaves nothing behind.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safesteer.config import DataArguments, ModelArguments
from safesteer.data.formats import PROMPT_SUFFIXES
from safesteer.direction.artifact import Direction
from safesteer.direction_config import DirectionConfig
from safesteer.distill.checkpoint import DISTILL_ARTIFACTS, STUDENT_DIR
from safesteer.distill.export import merge_student
from safesteer.errors import SafesteerError
from safesteer.evaluate.config import EvalArguments, split_target
from safesteer.evaluate.harness import evaluate_targets
from safesteer.htmlreport.command import report_hint
from safesteer.io import (
    EVAL_KIND,
    EXPORT_KIND,
    RUN_KIND,
    check_apart,
    check_output_dir,
    claim_output_dir,
    guard_output_dir,
)
from safesteer.models.layout import num_layers
from safesteer.models.loading import check_model_arguments, load_model, model_id
from safesteer.pipeline import safety_tokens, teacher_direction
from safesteer.tokens_config import TokensConfig
from safesteer.validation import check_layers

if TYPE_CHECKING:
    from safesteer.cli import ExportArguments, OutputArguments, TokensArguments

RUN_TARGETS = ("teacher", "conditional-teacher", "student")


def direction_command(model_args: ModelArguments, data_args: DataArguments,
                      config: DirectionConfig, output: OutputArguments) -> None:
    output_dir = check_output_dir(Path(output.output_dir), RUN_KIND, overwrite=output.overwrite)
    check_model_arguments(model_args)
    data_args.check(*config.prompt_sets())
    model, tokenizer = load_model(model_args)
    check_layers("response_layers", config.response_layers, num_layers(model))
    claim_output_dir(output_dir, RUN_KIND, overwrite=output.overwrite)
    direction = teacher_direction(model, tokenizer, output_dir, False, config, data_args,
                                  model_id(model_args))
    meta = direction.metadata
    print(f"method: {meta['method']} ({meta['selection_reason']})")
    print(f"layer: {direction.layer}  position: {meta['position']}  "
          f"coefficient: {direction.coefficient:.4g}  beta: {meta['beta']}")
    if meta["method"] == "response":
        report = meta["reports"]["response"]
        selected = meta["selected"]
        print(f"validation refusal, harmful: base {report['base_refusal']['harmful']:.0%} -> "
              f"steered {selected['harmful_refusal']:.0%};  harmless: base "
              f"{report['base_refusal']['harmless']:.0%} -> steered "
              f"{selected['harmless_refusal']:.0%}")
    print(f"wrote {output_dir / 'direction.safetensors'} and {output_dir / 'direction.json'}")


def tokens_command(model_args: ModelArguments, data_args: DataArguments, config: TokensConfig,
                   run: TokensArguments) -> None:
    run_dir = guard_output_dir(Path(run.run_dir), ("safety_tokens.json",), run.overwrite,
                               derived=(*DISTILL_ARTIFACTS, "check.json"))
    direction = Direction.load(run_dir)
    check_model_arguments(model_args)
    data_args.check(config.vote_prompts)
    model, tokenizer = load_model(model_args)
    direction.check_compatible(model)
    tokens = safety_tokens(model, tokenizer, direction, run_dir, False, config, data_args)
    print(tokens.table())
    print(f"wrote {run_dir / 'safety_tokens.json'}")


def student_adapter(run_dir: Path) -> Path:
    """The LoRA adapter of a run's student; a one-line error when the run has none."""
    student = run_dir / STUDENT_DIR
    if not run_dir.is_dir():
        raise SafesteerError(f"--run-dir {run_dir}: no such run directory")
    if not student.is_dir():
        raise SafesteerError(f"{run_dir} has no student yet (no {STUDENT_DIR}/: its distillation has not "
                             f"finished); complete it with `safesteer run --resume --output-dir {run_dir}` "
                             "and its original options")
    if not (student / "adapter_config.json").is_file():
        if (student / "config.json").is_file():
            raise SafesteerError(f"{student} is a full fine-tune, already a plain model directory "
                                 "(load it with AutoModelForCausalLM); there is no adapter to merge")
        raise SafesteerError(f"{student} holds neither a LoRA adapter (adapter_config.json) nor a model "
                             "(config.json); rerun the distillation")
    return student


def export_command(model_args: ModelArguments, export: ExportArguments) -> None:
    output_dir, run_dir = Path(export.output_dir), Path(export.run_dir)
    check_apart(output_dir, run_dir, "--run-dir")
    check_output_dir(output_dir, EXPORT_KIND, overwrite=export.overwrite)
    adapter = student_adapter(run_dir)
    check_model_arguments(model_args)
    base, _ = load_model(ModelArguments(**{**asdict(model_args), "dtype": "float32"}))
    merge_student(base, adapter, output_dir)
    print(f"wrote the merged student to {output_dir}")


def eval_command(model_args: ModelArguments, data_args: DataArguments,
                 args: EvalArguments) -> dict[str, Any]:
    """``evaluate_targets`` in a directory of its own: a rerun continues an evaluation, but never
    writes its answers into a run directory or a folder of the user's."""
    output_dir = check_output_dir(Path(args.output_dir), EVAL_KIND)
    check_model_arguments(model_args)
    prompt_files = [name for name in args.benchmarks if Path(name).suffix in PROMPT_SUFFIXES]
    data_args.check(*args.exclude_near, *prompt_files)
    _check_run_targets(args)
    claim_output_dir(output_dir, EVAL_KIND)
    summary = evaluate_targets(model_args, data_args, args)
    print(report_hint(output_dir))
    return summary


def _check_run_targets(args: EvalArguments) -> None:
    """The run directory that the teacher and student targets are read from, checked before the
    evaluation directory is made."""
    needed = sorted({split_target(spec)[1] for spec in args.targets} & {*RUN_TARGETS})
    if not needed:
        return
    if args.run_dir is None:
        names = ", ".join(repr(name) for name in needed)
        raise SafesteerError(f"{'targets' if len(needed) > 1 else 'target'} {names} "
                             f"need{'' if len(needed) > 1 else 's'} --run-dir (a `safesteer run` directory)")
    if needed != ["student"]:
        Direction.load(args.run_dir)
    if "student" in needed and not (Path(args.run_dir) / STUDENT_DIR).is_dir():
        raise SafesteerError(f"target 'student': {args.run_dir} has no student yet (no {STUDENT_DIR}/); "
                             f"complete the run with `safesteer run --resume --output-dir {args.run_dir}`")
