"""``safesteer`` command line: one sub-command per stage, options from the typed configs.

Every option can also come from a YAML file given with ``--config``; flags on the command line
win. Errors the user can fix print one line and exit with status 2. Only the chosen command's code
is imported (``Command.handler``), so ``--help`` needs neither torch nor transformers.
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from safesteer import __version__, arguments
from safesteer.allocator import bound_kernel_caches, keep_freed_memory
from safesteer.arguments import Command
from safesteer.config import DataArguments, ModelArguments
from safesteer.direction_config import DirectionConfig
from safesteer.errors import SafesteerError
from safesteer.progress import quiet_when_not_a_terminal
from safesteer.run_config import RUN
from safesteer.tokens_config import TokensConfig
from safesteer.validation import check_not_empty, check_range

CHAT_TARGETS = ("base", "teacher", "student")
# Warnings the libraries print on every run, about their own API, that a user can do nothing about.
_THIRD_PARTIES = r"(transformers|peft|accelerate|torch|huggingface_hub|safetensors)(\.|$)"


@dataclass
class OutputArguments:
    """Where a command writes its artifacts."""

    output_dir: str = field(metadata={"help": "Run directory for the artifacts (created if missing; "
                                              "must be empty, or a run directory with --overwrite).",
                                      "metavar": "DIR"})
    overwrite: bool = field(default=False, metadata={
        "help": "Start --output-dir afresh when it holds a run: its whole contents are removed first "
                "(only a safesteer run directory is replaced)."})


@dataclass
class ChatArguments:
    """What to ask, and the run whose teacher and student answer."""

    run_dir: str = field(metadata={"help": "Run directory (or its direction.json): the direction makes "
                                           "the teacher, its student/ (LoRA adapter or full model) the "
                                           "student.", "metavar": "DIR"})
    targets: list[str] | None = field(default=None, metadata={
        "help": "Who answers, side by side (default: base teacher, and student once the run has one).",
        "choices": CHAT_TARGETS})
    prompt: list[str] | None = field(default=None, metadata={"help": "One or more prompts to answer."})
    prompts_file: str | None = field(default=None, metadata={
        "help": "File of prompts (.json/.jsonl/.csv/.txt).", "metavar": "FILE"})
    max_new_tokens: int = field(default=64, metadata={"help": "Tokens generated per answer. A prompt "
                                                              "too long for the model's context with "
                                                              "its answer keeps its end, with a warning."})
    batch_size: int = field(default=16, metadata={"help": "Prompts generated together."})

    def __post_init__(self) -> None:
        if not self.prompt and not self.prompts_file:
            raise SafesteerError("give --prompt TEXT or --prompts-file FILE")
        empty = [str(number) for number, text in enumerate(self.prompt or [], 1) if not text.strip()]
        if empty:
            raise SafesteerError(f"--prompt: prompt {', '.join(empty)} is empty; ask something")
        check_range(self, ("max_new_tokens", "batch_size"), low=1)
        check_not_empty(self, ("run_dir", "targets"))


@dataclass
class TokensArguments:
    """The run directory holding the direction; the token set is written next to it."""

    run_dir: str = field(metadata={"help": "Run directory with direction.json (from `safesteer direction`).",
                                   "metavar": "DIR"})
    overwrite: bool = field(default=False, metadata={
        "help": "Replace an existing safety_tokens.json (refused once a student was trained with it)."})


@dataclass
class ExportArguments:
    """Which student to merge and where the plain model goes."""

    run_dir: str = field(metadata={"help": "Run directory whose student/ holds a LoRA adapter.",
                                   "metavar": "DIR"})
    output_dir: str = field(metadata={"help": "Directory for the merged model (loadable with plain "
                                              "AutoModelForCausalLM).", "metavar": "DIR"})
    overwrite: bool = field(default=False, metadata={
        "help": "Replace --output-dir when it holds an earlier export (never a run or other folder)."})


def _eval_groups() -> tuple[tuple[type, str], ...]:
    from safesteer.evaluate.config import EvalArguments

    return (ModelArguments, "model"), (DataArguments, "data"), (EvalArguments, "evaluation")


def _compare_groups() -> tuple[tuple[type, str], ...]:
    from safesteer.compare_config import CompareArguments

    return (ModelArguments, "model"), (DataArguments, "data"), (CompareArguments, "comparison")


def _report_groups() -> tuple[tuple[type, str], ...]:
    from safesteer.htmlreport.command import ReportArguments

    return ((ReportArguments, "report"),)


COMMANDS: dict[str, Command] = {command.name: command for command in (
    Command("direction", "Extract and select a refusal direction; write the steered teacher's artifacts.",
            "safesteer.commands:direction_command",
            lambda: ((ModelArguments, "model"), (DataArguments, "data"),
                     (DirectionConfig, "stage 1: refusal direction"), (OutputArguments, "output"))),
    Command("chat", "Answer prompts side by side with the base model, the steered teacher and the "
                    "distilled student of a run.",
            "safesteer.chat:chat_command",
            lambda: ((ModelArguments, "model"), (DataArguments, "data"), (ChatArguments, "chat"))),
    Command("tokens", "Select the safety tokens by voting over steered rollouts; print them as a table.",
            "safesteer.commands:tokens_command",
            lambda: ((ModelArguments, "model"), (DataArguments, "data"),
                     (TokensConfig, "stage 2: safety tokens"), (TokensArguments, "run directory"))),
    RUN,
    Command("export", "Merge a run's LoRA student into a full model directory.",
            "safesteer.commands:export_command",
            lambda: ((ModelArguments, "model"), (ExportArguments, "export"))),
    Command("eval", "Score base, teacher, student (or any model) on safety, jailbreak, over-refusal and "
                    "capability benchmarks.", "safesteer.commands:eval_command", _eval_groups),
    Command("compare", "Train and evaluate several methods on one model and one data set; a paper-style "
                       "table and a safety-vs-capability Pareto plot.",
            "safesteer.compare:compare_methods", _compare_groups),
    Command("report", "One self-contained HTML page of a run, eval or compare directory: settings, "
                      "training curves, tokens, tables, plots and answers side by side.",
            "safesteer.htmlreport.command:report_command", _report_groups),
)}


def _usage() -> str:
    lines = [f"usage: safesteer COMMAND [options]   (safesteer {__version__})", "", "commands:"]
    lines += [f"  {name:<10} {command.help}" for name, command in COMMANDS.items()]
    lines += ["", "Run `safesteer COMMAND --help` for the options of a command."]
    return "\n".join(lines)


def parse(command: str, argv: Sequence[str]) -> tuple[Callable[..., Any], list[Any]]:
    """The command's handler and its configs, read from YAML, a preset and flags."""
    spec = COMMANDS[command]
    return spec.run, arguments.parse(spec, argv)


def _quiet_third_parties() -> None:
    """Keep the output to what safesteer says: no library deprecation notices, and off a terminal
    no library progress bars (the command's own become periodic log lines)."""
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=_THIRD_PARTIES)
    quiet_when_not_a_terminal()


def _one_line(error: SafesteerError) -> str:
    return " ".join(part.strip() for part in str(error).splitlines() if part.strip())


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if args[0] == "--version":
        print(__version__)
        return 0
    if args[0] not in COMMANDS:
        print(f"safesteer: error: unknown command {args[0]!r}; the commands are {', '.join(COMMANDS)} "
              "(see `safesteer --help`)", file=sys.stderr)
        return 2
    _quiet_third_parties()
    keep_freed_memory()
    bound_kernel_caches()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        handler, parsed = parse(args[0], args[1:])
        handler(*parsed)
    except SafesteerError as error:
        print(f"safesteer: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("safesteer: interrupted; completed artifacts are kept", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
