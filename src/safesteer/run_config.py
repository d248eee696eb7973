"""Options of ``safesteer run``: the run directory, training prompts and closing check, the presets,
and the command that gathers every stage's options. Apart from the pipeline, so that the command
line can list and check them without loading torch."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import yaml

from safesteer.arguments import Command
from safesteer.config import DataArguments, ModelArguments
from safesteer.direction_config import DirectionConfig
from safesteer.distill.config import DistillConfig
from safesteer.errors import SafesteerError
from safesteer.model_source import model_type
from safesteer.tokens_config import TokensConfig
from safesteer.validation import check_not_empty, check_range

logger = logging.getLogger(__name__)

OUTPUT_GROUP = "run directory"
CHECK_GROUP = "check: before/after refusal of base, teacher and student"


@dataclass
class RunArguments:
    """The run directory, the training prompts and the closing refusal check."""

    output_dir: str = field(metadata={"help": "Run directory: every stage's artifacts go here.",
                                      "metavar": "DIR", "group": OUTPUT_GROUP})
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
        "group": OUTPUT_GROUP,
        "help": "Continue a run in --output-dir: reuse finished stages, resume training from its last "
                "checkpoint."})
    overwrite: bool = field(default=False, metadata={
        "group": OUTPUT_GROUP,
        "help": "Start afresh in a directory holding a run: its whole contents are removed first (only "
                "a safesteer run directory is replaced; any other non-empty directory is refused)."})
    check_harmful: list[str] = field(
        default_factory=lambda: ["harmbench-test", "jbb", "donotanswer-test"],
        metadata={"group": CHECK_GROUP,
                  "help": "Held-out harmful prompt sets for the before/after refusal check "
                          "(instruction-style HarmBench and JBB, question-style Do-Not-Answer)."})
    check_benign: list[str] = field(
        default_factory=lambda: ["ordinary-test", "borderline-test"],
        metadata={"group": CHECK_GROUP,
                  "help": "Held-out benign prompt sets for the before/after refusal check; the "
                          "check also reports each model's worst of them."})
    check_limit: int = field(default=50, metadata={"help": "Prompts per check set (0 skips the check).",
                                                   "group": CHECK_GROUP})
    check_max_new_tokens: int = field(default=64, metadata={
        "group": CHECK_GROUP,
        "help": "Tokens generated per check answer; the keyword judge reads the first 200 characters, "
                "so shorter answers hide refusals that follow a helpful opening."})

    def __post_init__(self) -> None:
        if self.resume and self.overwrite:
            raise SafesteerError("--resume and --overwrite exclude each other")
        check_range(self, ("n_train_prompts", "check_max_new_tokens"), low=1)
        check_range(self, ("n_retain_prompts", "check_limit"), low=0)
        check_not_empty(self, ("train_prompts", "retain_prompts"))
        # A set with a count of 0 is allowed: it is how a preset's retain prompts are turned off.
        if self.n_retain_prompts > 0 and self.retain_prompts is None:
            raise SafesteerError("--n-retain-prompts > 0 needs --retain-prompts (a prompt set)")

    def prompt_sets(self) -> list[str | None]:
        """Every prompt set the run reads besides stages 1-2's: training, retain, check sets."""
        check = [*self.check_harmful, *self.check_benign] if self.check_limit else []
        return [self.train_prompts, self.retain_prompts, *check]


def _read_presets() -> dict[str, dict[str, Any]]:
    """The preset files shipped in ``safesteer/presets``, by name (the file's stem)."""
    files = resources.files("safesteer").joinpath("presets").iterdir()
    return {file.name.removesuffix(".yaml"): yaml.safe_load(file.read_text("utf-8"))
            for file in sorted(files, key=lambda file: file.name) if file.name.endswith(".yaml")}


_PRESET_FILES = _read_presets()
# name -> (--help text, option defaults); src/safesteer/presets/NAME.yaml.
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    name: (preset["description"], preset["options"]) for name, preset in _PRESET_FILES.items()}
# docs/method.md §7: the paper's per-family settings, keyed by the prefix of the config's model_type.
PAPER_FAMILIES: dict[str, dict[str, Any]] = _PRESET_FILES["paper"]["families"]


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


RUN = Command(
    "run", "The whole method: direction, safety tokens, distillation, before/after check.",
    "safesteer.pipeline:run_pipeline",
    lambda: ((ModelArguments, "model"), (DataArguments, "data"),
             (RunArguments, "stage 3: distillation (prompts)"),
             (DirectionConfig, "stage 1: refusal direction (as `safesteer direction`)"),
             (TokensConfig, "stage 2: safety tokens (as `safesteer tokens`)"),
             (DistillConfig, "stage 3: distillation")),
    group_order=("model", "data", OUTPUT_GROUP, "stage 1: refusal direction (as `safesteer direction`)",
                 "stage 2: safety tokens (as `safesteer tokens`)", "stage 3: distillation (prompts)",
                 "stage 3: distillation", CHECK_GROUP),
    presets=PRESETS, preset_defaults=preset_defaults)
