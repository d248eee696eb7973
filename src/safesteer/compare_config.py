"""What ``safesteer compare`` compares: the methods, built in or read from a YAML file (mistakes
reported with the file and line), and the command's arguments.

Imports nothing heavy, so ``safesteer compare --help`` and the checks of a methods file run without
torch; the training and evaluation are :mod:`safesteer.compare`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from safesteer.config import GENERATION_DTYPES, DataArguments, ModelArguments
from safesteer.direction_config import DirectionConfig
from safesteer.distill.config import SAFETY_SYSTEM_PROMPT, DistillConfig
from safesteer.errors import SafesteerError
from safesteer.evaluate.config import BUILT_IN_TARGETS, EvalArguments
from safesteer.run_config import PRESETS, RunArguments
from safesteer.tokens_config import TokensConfig
from safesteer.validation import check_choice, check_range

COMPARE_BENCHMARKS = ("harmbench-test", "jbb", "strongreject", "advbench-test", "donotanswer-test",
                      "borderline-unsafe-test", "xstest-proxy", "ordinary-test", "borderline-test",
                      "direction-ablation", "prefill", "mmlu-stem", "mmlu-nll", "gsm8k-nll",
                      "humaneval-nll", "kl-benign", "benign-nll")
# With --quick: one benchmark for each axis of the table (capability drift from one gold-answer
# NLL), the two cheap attacks included, and kl-benign.
QUICK_BENCHMARKS = ("harmbench-test", "ordinary-test", "direction-ablation", "prefill", "mmlu-nll",
                    "kl-benign")
# Evaluation sizes: (default, with --quick).
EVAL_SIZES = {"limit": (40, 4), "capability_limit": (48, 4), "max_new_tokens": (64, 8)}
INFERENCE_TARGETS = ("base", "teacher", "conditional-teacher")
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


def _names(*classes: type) -> set[str]:
    return {item.name for cls in classes for item in fields(cls)}


SHARED_STAGE_OPTIONS = _names(DirectionConfig, TokensConfig)
TRAINING_OPTIONS = _names(RunArguments, DistillConfig)
COMPARE_OWN_OPTIONS = _names(ModelArguments, DataArguments)
MANAGED_OPTIONS = {"output_dir", "resume", "overwrite", "check_limit"}


@dataclass(frozen=True)
class Method:
    """One compared method: an inference-time ``target`` (nothing trained) or ``run``, the
    ``safesteer run`` options that make it (applied on top of the preset)."""

    name: str
    description: str = ""
    target: str | None = None
    run: Mapping[str, Any] = field(default_factory=dict)
    where: str = "the built-in method list"  # for error messages: file and line

    @property
    def trains(self) -> bool:
        return self.target is None


DEFAULT_METHODS = (
    Method("teacher", "inference-time steering alone (the teacher)", target="teacher"),
    Method("conditional-teacher", "inference-time steering of the prompts the harmfulness gate "
                                  "flags", target="conditional-teacher"),
    Method("safesteer", "SafeSteer: the preset as is (--preset demo adds benign retain prompts, "
                        "beyond the paper)", run={}),
    Method("safesteer-harmful-only", "SafeSteer on the harmful prompts alone, as in the paper (no "
                                     "retain prompts)", run={"n_retain_prompts": 0}),
    Method("safesteer-conditional", "SafeSteer from the conditional teacher; uses general data "
                                    "(benign prompts, taught as the gate decides)",
           run={"conditional_teacher": True, "retain_prompts": "direction-harmless-train",
                "n_retain_prompts": 28}),
    Method("opd-full", "on-policy distillation over the whole vocabulary",
           run={"mode": "full", "complement": False}),
    Method("opd-topk", "on-policy distillation over the teacher's top 50 tokens",
           run={"mode": "topk", "top_k": 50, "complement": False}),
    Method("subset-renormalize", "the safety-token slice renormalised (no complement)",
           run={"renormalize": True, "complement": False}),
    Method("forward-kl", "SafeSteer with the forward KL", run={"alpha": 0.0}),
    Method("system-prompt-teacher", "the teacher is a safety system prompt instead of steering",
           run={"teacher_system_prompt": SAFETY_SYSTEM_PROMPT}),
    Method("sft", "SFT on the steered teacher's samples (offline distillation)",
           run={"mode": "sft", "complement": False}),
)


@dataclass
class CompareArguments:
    """Where the comparison goes, which methods it trains, and how much it evaluates."""

    output_dir: str = field(metadata={
        "help": "Directory for runs/ (one `safesteer run` per training method), eval/, compare.md, "
                "compare.json and pareto.png; a rerun into it resumes."})
    methods: str | None = field(default=None, metadata={
        "help": "YAML file of the methods (see the README, 'Comparing methods'), or built-in "
                "methods by name, comma-separated (teacher,safesteer); default: every built-in "
                "one: " + ", ".join(method.name for method in DEFAULT_METHODS) + "."})
    preset: str = field(default="demo", metadata={
        "help": "The `safesteer run --preset` every training method starts from.",
        "choices": sorted(PRESETS)})
    quick: bool = field(default=False, metadata={
        "help": "A tiny version for CI: stages 1-2 on small sets (response-method direction), every "
                "method trained 2 steps on 4 prompts with 8-token samples, one benchmark per axis of "
                "the table (" + ", ".join(QUICK_BENCHMARKS) + ") unless --benchmarks is given, 4 items "
                "per benchmark, 8-token answers."})
    benchmarks: list[str] = field(default_factory=lambda: list(COMPARE_BENCHMARKS), metadata={
        "help": "Benchmarks of the evaluation (see `safesteer eval --help`); default: "
                + ", ".join(COMPARE_BENCHMARKS) + "."})
    limit: int | None = field(default=None, metadata={
        "help": "Prompts per safety and over-refusal benchmark (default 40, 4 with --quick; 0 = all)."})
    capability_limit: int | None = field(default=None, metadata={
        "help": "Items per capability benchmark (default 48, 4 with --quick; 0 = all)."})
    max_new_tokens: int | None = field(default=None, metadata={
        "help": "Tokens generated per evaluated answer (default 64, as the demo check; 8 with --quick)."})
    score_dtype: str = field(default="model", metadata={
        "help": "Products of the evaluation's teacher-forced measures, as `safesteer eval "
                "--score-dtype`: model, bfloat16, or auto (bfloat16 on a CPU with native bfloat16).",
        "choices": GENERATION_DTYPES})
    jobs: int = field(default=1, metadata={
        "help": "Jobs at a time, each in its own process: the trainings (the others starting once "
                "the first has written the shared stages 1-2) and the evaluation of each target (once "
                "it is trained), which fills the slots the trainings leave. The results are the same. "
                "On this project's 2-core CPU 2 jobs run about 1.4x as fast as one after the other "
                "(their OpenMP threads then wait passively: OMP_WAIT_POLICY=PASSIVE unless set); "
                "train and eval seconds are then those taken sharing the machine."})

    def __post_init__(self) -> None:
        check_choice(self, "preset", sorted(PRESETS))
        check_range(self, "jobs", low=1)
        if self.quick and self.benchmarks == list(COMPARE_BENCHMARKS):
            self.benchmarks = list(QUICK_BENCHMARKS)
        for name, sizes in EVAL_SIZES.items():
            if getattr(self, name) is None:
                setattr(self, name, sizes[self.quick])
        # Checks the benchmarks and sizes now, before anything runs (the evaluation's run is the
        # first method's, in the output directory).
        self.evaluation(["base"], self.output_dir)

    def evaluation(self, targets: list[str], run_dir: str) -> EvalArguments:
        """The arguments of the closing evaluation (``OUT/eval``)."""
        assert self.limit is not None and self.capability_limit is not None and self.max_new_tokens
        return EvalArguments(output_dir=str(Path(self.output_dir) / "eval"), targets=targets,
                             run_dir=run_dir, benchmarks=self.benchmarks, limit=self.limit,
                             capability_limit=self.capability_limit, max_new_tokens=self.max_new_tokens,
                             score_dtype=self.score_dtype)


# ------------------------------------------------------------------------- the methods file


def _located(path: str, line: int | None, message: str) -> SafesteerError:
    return SafesteerError(f"{path}: line {line}: {message}" if line else f"{path}: {message}")


def _children(node: yaml.Node) -> dict[str, tuple[int, yaml.Node]]:
    """Each key of a YAML mapping node with its 1-based line and its value node."""
    assert isinstance(node, yaml.MappingNode)
    return {str(key.value): (key.start_mark.line + 1, value) for key, value in node.value}


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


def run_option_problem(key: str, shared: bool) -> str | None:
    """Why ``key`` cannot be a method's ``safesteer run`` option (``shared``: one applied to every
    method), or None when it can."""
    if key in MANAGED_OPTIONS:
        return f"{key} is set by `safesteer compare` itself"
    if key in COMPARE_OWN_OPTIONS:
        return (f"{key} is an option of `safesteer compare` (--{key.replace('_', '-')}); every method "
                "uses the same model and data")
    if key in SHARED_STAGE_OPTIONS and not shared:
        return (f"{key} configures stages 1-2 (direction, safety tokens), which every method shares; "
                "set it in the file's top-level run: mapping instead")
    if key not in TRAINING_OPTIONS | SHARED_STAGE_OPTIONS:
        return f"unknown run option {key!r} (see `safesteer run --help`)"
    return None


def _run_options(path: str, node: yaml.Node, value: Any, shared: bool) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _located(path, _line(node), "run: expected a mapping of `safesteer run` options")
    options: dict[str, Any] = {}
    for key, (line, _) in _children(node).items():
        name = key.replace("-", "_")
        problem = run_option_problem(name, shared)
        if problem:
            raise _located(path, line, problem)
        options[name] = value[key]
    return options


def _method(path: str, node: yaml.Node, value: Any) -> Method:
    where = f"{path}: line {_line(node)}"
    if not isinstance(value, dict):
        raise _located(path, _line(node), "expected a method: a mapping with name and target or run")
    children = _children(node)
    for key, (line, _) in children.items():
        if key not in ("name", "description", "target", "run"):
            raise _located(path, line, f"unknown method key {key!r}; expected name, description, "
                                       "target or run")
    name = value.get("name")
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise _located(path, _line(node), "each method needs a name of letters, digits, - and _ "
                                          f"(it names a directory), got {name!r}")
    target = value.get("target")
    if ("target" in value) == ("run" in value):
        raise _located(path, _line(node), f"method {name!r}: give either target "
                                          f"({', '.join(INFERENCE_TARGETS)}: nothing trained) or run "
                                          "(`safesteer run` options), not both or neither")
    if "target" in value and target not in INFERENCE_TARGETS:
        raise _located(path, children["target"][0], f"method {name!r}: target must be one of "
                                                    f"{', '.join(INFERENCE_TARGETS)}, got {target!r}")
    if name == "base" or (name in BUILT_IN_TARGETS and name != target):
        raise _located(path, children["name"][0], f"method name {name!r} is taken by the built-in "
                                                  "evaluation target; choose another")
    description = value.get("description", "")
    if not isinstance(description, str):
        raise _located(path, children["description"][0], f"method {name!r}: description must be text")
    run = _run_options(path, children["run"][1], value["run"], False) if "run" in value else {}
    return Method(name, description, target, run, where)


def chosen_methods(methods: str | None) -> tuple[list[Method], dict[str, Any]]:
    """What ``--methods`` names: every built-in method (None), a methods file (a path that exists
    or ends in .yaml/.yml, :func:`load_methods`), or built-in methods by name, comma-separated."""
    if methods is None:
        return list(DEFAULT_METHODS), {}
    if methods.endswith((".yaml", ".yml")) or Path(methods).exists():
        return load_methods(methods)
    built_in = {method.name: method for method in DEFAULT_METHODS}
    names = [name.strip() for name in methods.split(",")]
    for name in names:
        if name not in built_in:
            raise SafesteerError(f"--methods {methods}: {name!r} is neither a file nor a built-in method "
                                 f"({', '.join(built_in)})")
    if len(set(names)) < len(names) or not any(built_in[name].trains for name in names):
        raise SafesteerError(f"--methods {methods}: name each method once, and at least one that "
                             "trains (the teacher's direction comes from the first one's run)")
    return [built_in[name] for name in names], {}


def load_methods(path: str) -> tuple[list[Method], dict[str, Any]]:
    """The methods of a YAML file and the ``safesteer run`` options they all share.

    The file is a list of methods, or a mapping with ``methods`` (that list) and ``run`` (options
    for every training method, the only place for the direction and safety-token options). A method
    is a mapping: ``name``, optional ``description``, and ``target`` or ``run``. Mistakes are
    reported with the file and line.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        loaded = yaml.safe_load(text)
    except OSError as error:
        raise SafesteerError(f"methods file {path}: cannot read it ({error.strerror})") from error
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        raise _located(path, mark.line + 1 if mark else None, "invalid YAML") from error
    shared: dict[str, Any] = {}
    if isinstance(loaded, dict):
        children = _children(root)
        for key, (line, _) in children.items():
            if key not in ("methods", "run"):
                raise _located(path, line, f"unknown key {key!r}; expected methods and run")
        if "run" in children:
            shared = _run_options(path, children["run"][1], loaded["run"], True)
        if "methods" not in children:
            raise _located(path, _line(root), "expected methods: (a list of methods)")
        root, loaded = children["methods"][1], loaded["methods"]
    if not isinstance(loaded, list) or not loaded:
        raise _located(path, _line(root) if root else None,
                       "expected a non-empty list of methods (or a mapping with methods: and run:)")
    methods: list[Method] = []
    lines: dict[str, int] = {}
    for node, value in zip(root.value, loaded, strict=True):
        method = _method(path, node, value)
        if method.name in lines:
            raise _located(path, _line(node), f"method name {method.name!r} is used twice (first on "
                                              f"line {lines[method.name]})")
        lines[method.name] = _line(node)
        methods.append(method)
    if not any(method.trains for method in methods):
        raise _located(path, None, "needs at least one method with run: options (the teacher's "
                                   "direction comes from the first one's run)")
    return methods, shared
