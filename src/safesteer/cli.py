"""``safesteer`` command line: one sub-command per stage, options from the typed configs.

Every option can also come from a YAML file given with ``--config``; flags on the command line
win. Errors the user can fix print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
import textwrap
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser

from safesteer import __version__
from safesteer.compare import CompareArguments, compare_methods
from safesteer.config import DataArguments, ModelArguments
from safesteer.direction import Direction, DirectionConfig
from safesteer.distill.checkpoint import DISTILL_ARTIFACTS
from safesteer.distill.config import DistillConfig
from safesteer.distill.export import merge_student
from safesteer.errors import SafesteerError
from safesteer.evaluate.harness import EvalArguments, evaluate_targets
from safesteer.io import (
    EVAL_KIND,
    EXPORT_KIND,
    RUN_KIND,
    check_apart,
    check_output_dir,
    claim_output_dir,
    guard_output_dir,
)
from safesteer.models import generate_responses, load_model, model_id
from safesteer.pipeline import (
    PRESETS,
    RunArguments,
    preset_defaults,
    run_pipeline,
    safety_tokens,
    teacher_direction,
)
from safesteer.tokens import TokensConfig


@dataclass
class OutputArguments:
    """Where a command writes its artifacts."""

    output_dir: str = field(metadata={"help": "Run directory for the artifacts (created if missing; "
                                              "must be empty, or a run directory with --overwrite)."})
    overwrite: bool = field(default=False, metadata={
        "help": "Start --output-dir afresh when it holds a run: its whole contents are removed first "
                "(only a safesteer run directory is replaced)."})


@dataclass
class ChatArguments:
    """What to ask, and which direction steers the teacher."""

    run_dir: str = field(metadata={"help": "Run directory (or direction.json) holding the "
                                           "direction that makes the teacher."})
    prompt: list[str] | None = field(default=None,
                                     metadata={"help": "One or more prompts to answer."})
    prompts_file: str | None = field(default=None, metadata={"help": "File of prompts "
                                                                     "(.json/.jsonl/.csv/.txt)."})
    max_new_tokens: int = field(default=64, metadata={"help": "Tokens generated per answer."})
    batch_size: int = field(default=16, metadata={"help": "Prompts generated together."})

    def __post_init__(self) -> None:
        if not self.prompt and not self.prompts_file:
            raise SafesteerError("give --prompt TEXT or --prompts-file FILE")


def direction_command(model_args: ModelArguments, data_args: DataArguments,
                      config: DirectionConfig, output: OutputArguments) -> None:
    output_dir = check_output_dir(Path(output.output_dir), RUN_KIND, overwrite=output.overwrite)
    model, tokenizer = load_model(model_args)
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


def chat_command(model_args: ModelArguments, data_args: DataArguments,
                 chat: ChatArguments) -> None:
    prompts = list(chat.prompt or [])
    if chat.prompts_file:
        prompts += data_args.load(chat.prompts_file)
    direction = Direction.load(chat.run_dir)
    model, tokenizer = load_model(model_args)
    direction.check_compatible(model)
    options = {"max_new_tokens": chat.max_new_tokens, "batch_size": chat.batch_size}
    base = generate_responses(model, tokenizer, prompts, desc="base", **options)
    with direction.steer(model):
        teacher = generate_responses(model, tokenizer, prompts, desc="teacher", **options)
    for prompt, base_answer, teacher_answer in zip(prompts, base, teacher, strict=True):
        print(f"\n>>> {prompt}")
        print(textwrap.indent(base_answer, "  base    | ", lambda _: True))
        print(textwrap.indent(teacher_answer, "  teacher | ", lambda _: True))


@dataclass
class TokensArguments:
    """The run directory holding the direction; the token set is written next to it."""

    run_dir: str = field(metadata={"help": "Run directory with direction.json (from `safesteer direction`)."})
    overwrite: bool = field(default=False, metadata={
        "help": "Replace an existing safety_tokens.json (refused once a student was trained with it)."})


def tokens_command(model_args: ModelArguments, data_args: DataArguments, config: TokensConfig,
                   run: TokensArguments) -> None:
    run_dir = guard_output_dir(Path(run.run_dir), ("safety_tokens.json",), run.overwrite,
                               derived=(*DISTILL_ARTIFACTS, "check.json"))
    direction = Direction.load(run_dir)
    model, tokenizer = load_model(model_args)
    direction.check_compatible(model)
    tokens = safety_tokens(model, tokenizer, direction, run_dir, False, config, data_args)
    print(tokens.table())
    print(f"wrote {run_dir / 'safety_tokens.json'}")


@dataclass
class ExportArguments:
    """Which student to merge and where the plain model goes."""

    run_dir: str = field(metadata={"help": "Run directory whose student/ holds a LoRA adapter."})
    output_dir: str = field(metadata={"help": "Directory for the merged model (loadable with plain "
                                              "AutoModelForCausalLM)."})
    overwrite: bool = field(default=False, metadata={
        "help": "Replace --output-dir when it holds an earlier export (never a run or other folder)."})


def export_command(model_args: ModelArguments, export: ExportArguments) -> None:
    output_dir = Path(export.output_dir)
    check_apart(output_dir, Path(export.run_dir), "--run-dir")
    check_output_dir(output_dir, EXPORT_KIND, overwrite=export.overwrite)
    base, _ = load_model(ModelArguments(**{**asdict(model_args), "dtype": "float32"}))
    merge_student(base, Path(export.run_dir) / "student", output_dir)
    print(f"wrote the merged student to {output_dir}")


def eval_command(model_args: ModelArguments, data_args: DataArguments,
                 args: EvalArguments) -> dict[str, Any]:
    """``evaluate_targets`` in a directory of its own: a rerun continues an evaluation, but never
    writes its answers into a run directory or a folder of the user's."""
    output_dir = check_output_dir(Path(args.output_dir), EVAL_KIND)
    claim_output_dir(output_dir, EVAL_KIND)
    return evaluate_targets(model_args, data_args, args)


COMMANDS: dict[str, tuple[Callable[..., None], tuple[type, ...], str]] = {
    "direction": (direction_command,
                  (ModelArguments, DataArguments, DirectionConfig, OutputArguments),
                  "Extract and select a refusal direction; write the steered teacher's artifacts."),
    "chat": (chat_command, (ModelArguments, DataArguments, ChatArguments),
             "Answer prompts side by side with the base model and the steered teacher."),
    "tokens": (tokens_command, (ModelArguments, DataArguments, TokensConfig, TokensArguments),
               "Select the safety tokens by voting over steered rollouts; print them as a table."),
    "run": (run_pipeline,
            (ModelArguments, DataArguments, RunArguments, DirectionConfig, TokensConfig, DistillConfig),
            "The whole method: direction, safety tokens, distillation, before/after check."),
    "export": (export_command, (ModelArguments, ExportArguments),
               "Merge a run's LoRA student into a full model directory."),
    "eval": (eval_command, (ModelArguments, DataArguments, EvalArguments),
             "Score base, teacher, student (or any model) on safety, jailbreak, over-refusal and "
             "capability benchmarks."),
    "compare": (compare_methods, (ModelArguments, DataArguments, CompareArguments),
                "Train and evaluate several methods on one model and one data set; a paper-style "
                "table and a safety-vs-capability Pareto plot."),
}


def _usage() -> str:
    lines = [f"usage: safesteer COMMAND [options]   (safesteer {__version__})", "", "commands:"]
    lines += [f"  {name:<10} {help_text}" for name, (_, _, help_text) in COMMANDS.items()]
    lines += ["", "Run `safesteer COMMAND --help` for the options of a command."]
    return "\n".join(lines)


def _yaml_arguments(path: str, dataclass_types: Sequence[type]) -> list[str]:
    """A flat YAML mapping as command-line tokens, so its values are parsed exactly like flags
    (types, lists, required options); placed before the real flags, which therefore win."""
    try:
        loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except FileNotFoundError as missing:
        raise SafesteerError(f"config file {path} does not exist") from missing
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f": line {mark.line + 1}" if mark else ""
        raise SafesteerError(f"{path}{where}: invalid YAML") from error
    if not isinstance(loaded, dict):
        raise SafesteerError(f"{path}: expected a mapping of option names to values")
    known = {item.name for cls in dataclass_types for item in fields(cls)}
    unknown = sorted(key for key in loaded if key.replace("-", "_") not in known)
    if unknown:
        raise SafesteerError(f"{path}: unknown option(s) {', '.join(unknown)}")
    return option_flags(loaded)


def option_flags(options: Mapping[str, Any]) -> list[str]:
    """Option values as command-line tokens (``{"top_k": 5, "complement": False}`` ->
    ``--top_k 5 --complement false``; a list gives one token per item), which the parser reads back
    exactly like typed flags; a None value is left out, so the option keeps its default."""
    tokens: list[str] = []
    for key, value in options.items():
        if value is None:
            continue
        values = value if isinstance(value, list) else [value]
        tokens += [f"--{key.replace('-', '_')}",
                   *(str(item).lower() if isinstance(item, bool) else str(item) for item in values)]
    return tokens


def parse(command: str, argv: Sequence[str]) -> tuple[Callable[..., None], list[Any]]:
    """Build the command's parser from its dataclasses and parse YAML + flags into them."""
    handler, dataclass_types, help_text = COMMANDS[command]
    parser = HfArgumentParser(dataclass_types, prog=f"safesteer {command}", description=help_text)
    parser.add_argument("--config", default=None,
                        help="YAML file with any of the options below (flags win).")
    if command == "run":
        parser.add_argument("--preset", default=None, choices=sorted(PRESETS),
                            help="Defaults for a whole run, overridden by --config and flags: "
                                 + "; ".join(f"{name}: {text}" for name, (text, _) in PRESETS.items()))
    early = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    early.add_argument("--config")
    early.add_argument("--preset")
    early.add_argument("--model")
    # ``--preset`` on another command falls through to the unknown-option error below.
    known = early.parse_known_args(list(argv))[0]
    arguments = list(argv)
    if known.config:
        arguments = _yaml_arguments(known.config, dataclass_types) + arguments
    if known.preset in PRESETS and command == "run":
        model = (early.parse_known_args(arguments)[0].model or PRESETS[known.preset][1].get("model")
                 or ModelArguments.model)
        parser.set_defaults(**preset_defaults(known.preset, model))
    *parsed, remaining = parser.parse_args_into_dataclasses(arguments, return_remaining_strings=True)
    if remaining:
        raise SafesteerError(f"unknown option(s) {' '.join(remaining)}; see `safesteer {command} --help`")
    return handler, [item for item in parsed if not isinstance(item, argparse.Namespace)]


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if args[0] == "--version":
        print(__version__)
        return 0
    if args[0] not in COMMANDS:
        print(f"safesteer: error: unknown command {args[0]!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        handler, parsed = parse(args[0], args[1:])
        handler(*parsed)
    except SafesteerError as error:
        print(f"safesteer: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("safesteer: interrupted; completed artifacts are kept", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
