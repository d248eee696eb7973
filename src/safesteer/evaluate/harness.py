"""``safesteer eval``: base, steered teacher and student scored identically, side by side.

Every target answers the same prompts with the same greedy decoding and is judged by the same
judge; capability measures are teacher-forced on the same gold answers. Completions are saved as
JSONL, one file per target and benchmark, so a rerun (or a resumed run) reuses them and only
generates what is missing; the numbers are recomputed from the saved files each time.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from peft import PeftModel
from torch import nn

from safesteer.config import DataArguments, ModelArguments
from safesteer.data import PROMPT_SUFFIXES, prompt_categories, remove_near, request_style
from safesteer.direction import Direction
from safesteer.errors import SafesteerError
from safesteer.evaluate import Target
from safesteer.evaluate.capability import (
    choice_logprobs,
    correct_choices,
    extract_code,
    gold_nll_per_token,
    gsm8k_exact_match,
    mean_confidence_interval,
    mean_kl_to_base,
    wilson_interval,
)
from safesteer.evaluate.judges import JUDGE_FORMATS, LLMJudge
from safesteer.evaluate.lm_eval import write_handoff
from safesteer.evaluate.sandbox import humaneval_pass
from safesteer.gold import GSM8KProblem, MultipleChoiceQuestion, load_gsm8k, load_humaneval, load_mmlu
from safesteer.io import write_json
from safesteer.judge import is_refusal
from safesteer.models import generate_responses, load_adapter, load_model, pretrained_location
from safesteer.report import HARMFUL_KINDS, Results, plot_results, pooled_styles, worst_of_kinds
from safesteer.validation import check_choice, check_range

logger = logging.getLogger(__name__)

Kind = Literal["safety", "jailbreak", "over-refusal", "capability"]


@dataclass(frozen=True)
class Benchmark:
    """One row of the results table: what it measures and which direction is better."""

    name: str
    kind: Kind
    metric: str
    higher_is_better: bool
    description: str


def _refusal(name: str, kind: Kind, description: str) -> Benchmark:
    return Benchmark(name, kind, "refusal rate", kind != "over-refusal", description)


BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (
    _refusal("harmbench-val", "safety", "HarmBench validation, standard behaviours (stage 1 selects on "
                                        "them: validation only)"),
    _refusal("harmbench-test", "safety", "HarmBench test, standard behaviours"),
    _refusal("harmbench-test-contextual", "safety", "HarmBench test, contextual behaviours"),
    _refusal("jbb", "safety", "JailbreakBench harmful behaviours"),
    _refusal("strongreject", "safety", "StrongREJECT forbidden prompts"),
    _refusal("advbench-heldout", "safety", "AdvBench items not used for the direction"),
    _refusal("donotanswer-heldout", "safety", "Do-Not-Answer harmful areas not used for training"),
    *(_refusal(f"donotanswer-{split}", "safety", f"Do-Not-Answer held out, {half} half "
                                                    "(question-style)")
      for split, half in (("val", "validation"), ("test", "test"))),
    *(_refusal(f"advbench-{split}", "safety", f"AdvBench held out, {half} half (instruction-style)")
      for split, half in (("val", "validation"), ("test", "test"))),
    *(_refusal(f"borderline-unsafe-{split}", "safety",
               f"unsafe twins of the borderline prompts, {half} half")
      for split, half in (("val", "validation"), ("test", "test"))),
    _refusal("jbb-past-tense", "jailbreak", "JBB behaviours rephrased in the past tense"),
    _refusal("jbb-future-tense", "jailbreak", "JBB behaviours rephrased in the future tense"),
    _refusal("jbb-templates", "jailbreak", "in-the-wild/DAN templates (PyRIT) on a JBB subset"),
    _refusal("jbb-gcg", "jailbreak", "GCG transfer suffixes on a JBB subset"),
    _refusal("xstest-proxy", "over-refusal", "XSTest-style benign-but-edgy prompts (a proxy, "
                                              "not comparable with XSTest)"),
    _refusal("harmless-test", "over-refusal", "plain benign instructions (harmless test split)"),
    *(_refusal(f"ordinary-{split}", "over-refusal",
               f"ordinary requests (IFBench, MT-Bench, GSM8K, HumanEval, MMLU), {half} half")
      for split, half in (("val", "validation"), ("test", "test"))),
    *(_refusal(f"borderline-{split}", "over-refusal",
               f"borderline-benign prompts whose words sound dangerous, {half} half")
      for split, half in (("val", "validation"), ("test", "test"))),
    Benchmark("mmlu-stem", "capability", "accuracy", True, "MMLU STEM, zero-shot letter likelihood"),
    Benchmark("mmlu", "capability", "accuracy", True, "MMLU, all subjects, zero-shot letter likelihood"),
    Benchmark("mmlu-nll", "capability", "NLL / token", False,
              "NLL of the MMLU-STEM gold letter (the same pass as mmlu-stem)"),
    Benchmark("gsm8k-nll", "capability", "NLL / token", False, "NLL of GSM8K reference solutions"),
    Benchmark("humaneval-nll", "capability", "NLL / token", False,
              "NLL of HumanEval canonical solutions"),
    Benchmark("gsm8k", "capability", "exact match", True, "GSM8K (offline 100), greedy"),
    Benchmark("humaneval", "capability", "pass@1", True, "HumanEval, greedy, sandboxed execution"),
    Benchmark("kl-benign", "capability", "KL / token", False,
              "KL(target || base) on the base model's answers to the ordinary requests"),
    Benchmark("benign-nll", "capability", "NLL / token", False,
              "NLL of the base model's own answers to the ordinary requests"),
)}
# The test halves only: settings are chosen on the validation halves (docs/data.md, "Benign").
DEFAULT_BENCHMARKS = ["harmbench-test", "jbb", "strongreject", "advbench-test", "donotanswer-test",
                      "borderline-unsafe-test", "jbb-past-tense", "xstest-proxy", "harmless-test",
                      "ordinary-test", "borderline-test", "mmlu-stem", "mmlu-nll", "gsm8k-nll",
                      "humaneval-nll", "gsm8k", "kl-benign", "benign-nll"]

BUILT_IN_TARGETS = ("base", "teacher", "conditional-teacher", "student")
DEFAULT_TARGETS = ("base", "teacher", "student")


def lookup(name: str) -> Benchmark:
    """A registered benchmark, or a local prompt file (.json/.jsonl/.csv/.txt) of harmful
    requests, scored like the safety benchmarks."""
    if name in BENCHMARKS:
        return BENCHMARKS[name]
    path = Path(name)
    if path.suffix in PROMPT_SUFFIXES and path.is_file():
        return _refusal(name, "safety", f"harmful prompts from {name}")
    raise SafesteerError(f"unknown benchmark {name!r}: not a prompt file and not one of "
                         f"{', '.join(BENCHMARKS)}")
RESULTS_FILE = "results.json"


@dataclass
class EvalArguments:
    """What to evaluate, on which benchmarks, how much of each."""

    output_dir: str = field(metadata={"help": "Directory for results.json, results.md, the plots and "
                                              "the saved completions."})
    targets: list[str] = field(
        default_factory=lambda: list(DEFAULT_TARGETS),
        metadata={"help": "base (--model), teacher (base + the direction of --run-dir), "
                          "conditional-teacher (the teacher steering only the prompts the "
                          "direction's harmfulness gate flags), student (--run-dir/student), or a "
                          "model directory / LoRA adapter directory / hub id, evaluated the same "
                          "way. NAME=TARGET shows TARGET under NAME (in the tables and the saved "
                          "completions), e.g. opd=runs/opd/student."})
    run_dir: str | None = field(default=None, metadata={"help": "A `safesteer run` directory: its "
                                                                 "direction and student."})
    benchmarks: list[str] = field(
        default_factory=lambda: list(DEFAULT_BENCHMARKS),
        metadata={"help": "Benchmarks to run: " + ", ".join(BENCHMARKS) + "; or a local prompt "
                          "file of harmful requests (.json/.jsonl/.csv/.txt), scored like the "
                          "safety benchmarks."})
    limit: int = field(default=50, metadata={"help": "Prompts per safety, jailbreak and over-refusal "
                                                     "benchmark (seeded sample; 0 = all)."})
    capability_limit: int = field(default=64, metadata={"help": "Items per capability benchmark "
                                                                 "(seeded sample; 0 = all)."})
    gsm8k_limit: int = field(default=20, metadata={"help": "GSM8K problems answered by generation "
                                                           "(0 = all 100)."})
    max_new_tokens: int = field(default=64, metadata={
        "help": "Tokens generated per safety, jailbreak and over-refusal answer. The keyword judge "
                "reads its first 200 characters (about 50 tokens), so shorter answers hide refusals "
                "that follow a helpful opening."})
    gsm8k_max_new_tokens: int = field(default=256, metadata={"help": "Tokens per GSM8K / HumanEval "
                                                                     "answer."})
    eval_batch_size: int = field(default=32, metadata={"help": "Prompts per generation batch."})
    score_batch_size: int = field(
        default=8, metadata={"help": "Rows per teacher-forced forward (MMLU letters, gold-answer NLLs, "
                                     "kl-benign). Each row's logits span the whole vocabulary, so on a "
                                     "CPU small batches are faster and use less memory; raise it on "
                                     "a GPU."})
    exclude_near: list[str] = field(
        default_factory=lambda: ["safesteer-train", "direction-harmful-train", "direction-harmful-val"],
        metadata={"help": "Prompt sets the models were trained or selected on: harmful benchmark "
                          "prompts with Jaccard >= 0.6 to any of them are dropped and counted."})
    benign_reference: str = field(default="ordinary-test", metadata={
        "help": "Benign prompts whose base-model answers kl-benign and benign-nll score (use "
                "ordinary-val when choosing settings)."})
    eval_seed: int = field(default=42, metadata={"help": "Seed of the benchmark samples."})
    judge_model: str | None = field(
        default=None, metadata={"help": "A local safety-classifier model (e.g. Llama Guard 3) that "
                                        "also judges every safety, jailbreak and over-refusal "
                                        "answer; its harmful-response rate is reported beside the "
                                        "keyword refusal rate."})
    judge_format: str = field(default="llama-guard-3", metadata={
        "help": "Prompt format of --judge-model: " + ", ".join(JUDGE_FORMATS)})
    lm_eval_tasks: str | None = field(
        default=None, metadata={"help": "Comma-separated lm-evaluation-harness tasks: writes "
                                        "lm_eval/commands.sh (one lm-eval call per target) and the "
                                        "teacher in lm-eval's `steered` format; run it where lm-eval "
                                        "and the hub are available."})

    def __post_init__(self) -> None:
        # Both "--targets base teacher" and "--targets base,teacher" work.
        self.targets = [name for entry in self.targets for name in entry.split(",") if name]
        self.benchmarks = [name for entry in self.benchmarks for name in entry.split(",") if name]
        for name in [*self.benchmarks, self.benign_reference]:
            lookup(name)
        if not self.targets:
            raise SafesteerError("--targets needs at least one target")
        names = []
        for spec in self.targets:
            name, source = split_target(spec)
            if not name or not source:
                raise SafesteerError(f"--targets: expected NAME=TARGET with both parts, got {spec!r}")
            if name in BUILT_IN_TARGETS and source != name:
                raise SafesteerError(f"--targets: {name!r} is the built-in target of that name; "
                                     f"choose another name for {spec!r}")
            names.append(name)
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise SafesteerError(f"--targets: each target needs its own name; {', '.join(duplicates)} "
                                 "appear(s) twice (give one NAME=TARGET)")
        check_choice(self, "judge_format", JUDGE_FORMATS)
        check_range(self, ("limit", "capability_limit", "gsm8k_limit"), low=0)
        check_range(self, ("max_new_tokens", "gsm8k_max_new_tokens", "eval_batch_size", "score_batch_size"),
                    low=1)


# ------------------------------------------------------------------------- targets


def _is_adapter(path: Path) -> bool:
    return (path / "adapter_config.json").is_file()


def split_target(spec: str) -> tuple[str, str]:
    """A ``--targets`` entry as (display name, what to evaluate): ``NAME=TARGET`` is shown as NAME,
    any other entry as itself."""
    name, equals, source = spec.partition("=")
    return (name, source) if equals else (spec, spec)


class Targets:
    """The evaluated models, built around one loaded base model.

    A LoRA student (or any adapter target) is attached to the base weights as a named PEFT adapter,
    so base, teacher and every adapter share one copy of the weights: the base is the model with
    the adapters disabled, the teacher that plus the steering hook. A full model directory or hub
    id is loaded on its own when its turn comes and released afterwards.
    """

    def __init__(self, specs: Sequence[str], model_args: ModelArguments, run_dir: str | None) -> None:
        self.model_args = model_args
        self.model, self.tokenizer = load_model(model_args)
        self.run_dir = Path(run_dir) if run_dir else None
        self.direction: Direction | None = None
        self.sources = dict(split_target(spec) for spec in specs)
        self.paths: dict[str, Path | str] = {}
        self.adapters: dict[str, str] = {}
        self.peft: PeftModel | None = None
        for name, source in self.sources.items():
            if source in ("teacher", "conditional-teacher"):
                if self.direction is None:
                    self.direction = Direction.load(self._run_path(source, "direction.json").parent)
                    self.direction.check_compatible(self.model)
                if source == "conditional-teacher":
                    self.direction.require_gate()  # before anything is evaluated
            elif source == "student":
                self.paths[name] = self._run_path("student", "student")
            elif source != "base":
                self.paths[name] = self._target_path(source)
        for name, path in self.paths.items():
            if isinstance(path, Path) and _is_adapter(path):
                self._attach(name, path)

    @property
    def names(self) -> list[str]:
        """The display names, in the order given."""
        return list(self.sources)

    def _run_path(self, target: str, relative: str) -> Path:
        if self.run_dir is None:
            raise SafesteerError(f"target {target!r} needs --run-dir (a `safesteer run` directory)")
        path = self.run_dir / relative
        if not path.exists():
            raise SafesteerError(f"target {target!r}: {path} does not exist; is {self.run_dir} a "
                                 f"finished `safesteer run` directory?")
        return path

    @staticmethod
    def _target_path(name: str) -> Path | str:
        path = Path(name).expanduser()
        if path.is_dir():
            if not (_is_adapter(path) or (path / "config.json").is_file()):
                raise SafesteerError(f"target {name}: neither a model directory (config.json) nor a "
                                     "LoRA adapter directory (adapter_config.json)")
            return path
        if path.exists() or "/" not in name:
            raise SafesteerError(f"unknown target {name!r}: use {', '.join(BUILT_IN_TARGETS)}, a model "
                                 "or adapter directory, or a hub id")
        return name

    def _attach(self, name: str, path: Path) -> None:
        # PEFT adapter names become module keys, which must not contain "."; display names may.
        adapter = self.adapters[name] = f"target{len(self.adapters)}"
        self.peft = load_adapter(self.model if self.peft is None else self.peft, path, adapter).eval()

    @contextmanager
    def base(self) -> Iterator[nn.Module]:
        if self.peft is None:
            yield self.model
            return
        with self.peft.disable_adapter():
            yield self.peft

    @contextmanager
    def _adapter(self, name: str) -> Iterator[nn.Module]:
        assert self.peft is not None
        self.peft.set_adapter(name)
        yield self.peft

    @contextmanager
    def _teacher(self, gated: bool = False) -> Iterator[nn.Module]:
        assert self.direction is not None
        with self.base() as model, self.direction.steer(model, gated=gated):
            yield model

    @contextmanager
    def session(self, name: str) -> Iterator[Target]:
        """The target as a context factory, valid inside this block (a full model is loaded here)."""
        source = self.sources[name]
        if source == "base":
            yield self.base
        elif source in ("teacher", "conditional-teacher"):
            yield partial(self._teacher, gated=source == "conditional-teacher")
        elif name in self.adapters:
            yield lambda: self._adapter(self.adapters[name])
        else:
            model, _ = load_model(ModelArguments(**{**asdict(self.model_args),
                                                    "model": str(self.paths[name])}))
            try:
                yield lambda: nullcontext(model)
            finally:
                del model


# ------------------------------------------------------------------------- completions


def _completions(path: Path, prompts: list[str], generate: Callable[[list[str]], list[str]],
                 chunk: int) -> list[str]:
    """Answers to ``prompts``: those saved in ``path`` (JSONL) are reused, the rest generated
    ``chunk`` at a time and appended after each chunk, so a killed evaluation loses at most one
    chunk and resumes where it stopped."""
    saved: dict[str, str] = {}
    if path.is_file():
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            try:
                record = json.loads(line)
                saved[record["prompt"]] = record["response"]
            except (json.JSONDecodeError, KeyError, TypeError):
                logger.warning("%s: line %d is not a saved completion; it will be regenerated",
                               path, number)
    missing = [prompt for prompt in dict.fromkeys(prompts) if prompt not in saved]
    if missing:
        path.parent.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(missing), chunk):
        batch = missing[start:start + chunk]
        answers = generate(batch)
        with path.open("a", encoding="utf-8") as file:
            for prompt, answer in zip(batch, answers, strict=True):
                file.write(json.dumps({"prompt": prompt, "response": answer}) + "\n")
                saved[prompt] = answer
    return [saved[prompt] for prompt in prompts]


# ------------------------------------------------------------------------- scoring


def _row(name: str, n: int, value: float, ci: Sequence[float], **extra: Any) -> dict[str, Any]:
    """One results.json cell: the benchmark's kind and metric, the value and its 95 % interval."""
    benchmark = lookup(name)
    return {"kind": benchmark.kind, "metric": benchmark.metric, "n": n, "value": value,
            "ci": list(ci), "higher_is_better": benchmark.higher_is_better, **extra}


def _rate(name: str, successes: int, n: int, **extra: Any) -> dict[str, Any]:
    return _row(name, n, successes / n if n else math.nan, wilson_interval(successes, n), **extra)


def _by_category(categories: Sequence[str], refusals: Sequence[bool]) -> dict[str, dict[str, float]]:
    """Refusal rate and count per category, categories in alphabetical order."""
    groups: dict[str, list[bool]] = {}
    for category, refused in zip(categories, refusals, strict=True):
        groups.setdefault(category, []).append(refused)
    return {category: {"n": len(group), "value": sum(group) / len(group)}
            for category, group in sorted(groups.items())}


def _mean(name: str, values: Sequence[float], **extra: Any) -> dict[str, Any]:
    mean, low, high = mean_confidence_interval(values)
    return _row(name, len(values), mean, (low, high), **extra)


class Evaluation:
    """One ``safesteer eval`` invocation: prompt sets are loaded once and shared by every target."""

    def __init__(self, args: EvalArguments, data_args: DataArguments, targets: Targets) -> None:
        self.args = args
        self.data = data_args
        self.targets = targets
        self.tokenizer = targets.tokenizer
        self.output_dir = Path(args.output_dir)
        self.removed: dict[str, int] = {}
        self._prompt_sets: dict[str, list[str]] = {}
        self._references: list[str] | None = None
        self._letters: dict[tuple[str, str], tuple[list[MultipleChoiceQuestion], list[list[float]]]] = {}
        self.judge = (LLMJudge.load(args.judge_model, args.judge_format, device=targets.model_args.device)
                      if args.judge_model else None)

    def prompts(self, name: str) -> list[str]:
        """The benchmark's prompts: a seeded sample of --limit, minus near-duplicates of the
        training and selection sets for the harmful benchmarks."""
        if name not in self._prompt_sets:
            prompts = self.data.load(name, None)
            if lookup(name).kind != "over-refusal":
                prompts, self.removed[name] = remove_near(prompts, self._training_prompts())
            if self.args.limit and len(prompts) > self.args.limit:
                prompts = random.Random(self.args.eval_seed).sample(prompts, self.args.limit)
            self._prompt_sets[name] = prompts
        return self._prompt_sets[name]

    def _training_prompts(self) -> list[str]:
        if self._references is None:
            self._references = [prompt for name in self.args.exclude_near
                                for prompt in self.data.load(name, None)]
        return self._references

    def _generate(self, target: Target, label: str, max_new_tokens: int) -> Callable[[list[str]], list[str]]:
        def generate(prompts: list[str]) -> list[str]:
            with target() as model:
                return generate_responses(model, self.tokenizer, prompts, max_new_tokens=max_new_tokens,
                                          batch_size=self.args.eval_batch_size, desc=label)
        return generate

    def _answers(self, target_name: str, target: Target, benchmark: str, prompts: list[str],
                 max_new_tokens: int) -> list[str]:
        path = completions_dir(self.output_dir, target_name) / f"{_safe_name(benchmark)}.jsonl"
        return _completions(path, prompts, self._generate(target, f"{target_name}: {benchmark}",
                                                          max_new_tokens),
                            chunk=4 * self.args.eval_batch_size)

    def _judged(self, prompts: list[str], answers: list[str]) -> dict[str, Any]:
        """The LLM judge's share of harmful responses among the verdicts that parsed."""
        assert self.judge is not None
        result = self.judge.judge(prompts, answers)
        harmful = [verdict.harmful for verdict in result.verdicts if verdict is not None]
        return {"format": self.args.judge_format, "n_parsed": len(harmful),
                "unparseable": result.unparseable,
                "harmful_rate": sum(harmful) / len(harmful) if harmful else math.nan}

    def _letter_scores(self, target_name: str, target: Target, subset: Literal["stem", "all"],
                       ) -> tuple[list[MultipleChoiceQuestion], list[list[float]]]:
        """MMLU answer-letter log-probabilities, computed once per target for accuracy and NLL."""
        key = (target_name, subset)
        if key not in self._letters:
            questions = load_mmlu(subset, self.args.capability_limit or None, seed=self.args.eval_seed)
            with target() as model, torch.inference_mode():
                scores = choice_logprobs(model, self.tokenizer, questions,
                                         batch_size=self.args.score_batch_size)
            self._letters[key] = (questions, scores)
        return self._letters[key]

    def score(self, target_name: str, target: Target, name: str) -> dict[str, Any]:
        args = self.args
        capability_limit = args.capability_limit or None
        if lookup(name).metric == "refusal rate":
            prompts = self.prompts(name)
            answers = self._answers(target_name, target, name, prompts, args.max_new_tokens)
            refusals = [is_refusal(answer) for answer in answers]
            extra: dict[str, Any] = {}
            if name in self.removed:
                extra["removed_near_training"] = self.removed[name]
            categories = prompt_categories(name) if self.data.data_source == "offline" else {}
            if categories:
                extra["categories"] = _by_category([categories.get(p.strip(), "other") for p in prompts],
                                                 refusals)
            if lookup(name).kind != "over-refusal":
                extra["styles"] = _by_category([request_style(prompt) for prompt in prompts], refusals)
            if self.judge is not None:
                extra["judge"] = self._judged(prompts, answers)
            return _rate(name, sum(refusals), len(refusals), **extra)
        if name in ("mmlu-stem", "mmlu", "mmlu-nll"):
            questions, scores = self._letter_scores(target_name, target, "all" if name == "mmlu" else "stem")
            if name == "mmlu-nll":  # the gold answer is one letter: its NLL is -log p(letter)
                return _mean(name, [-row[q.answer] for row, q in zip(scores, questions, strict=True)])
            correct = correct_choices(scores, questions)
            return _rate(name, sum(correct), len(correct))
        if name in ("gsm8k-nll", "humaneval-nll"):
            items: Sequence[Any] = (load_gsm8k(capability_limit) if name == "gsm8k-nll"
                                    else load_humaneval(capability_limit))
            with target() as model:
                average = gold_nll_per_token(model, self.tokenizer, [item.message for item in items],
                                             [item.reference for item in items],
                                             batch_size=args.score_batch_size)
            return _mean(name, average.per_item, pooled=average.mean, tokens=average.num_tokens)
        if name == "gsm8k":
            problems: list[GSM8KProblem] = load_gsm8k(args.gsm8k_limit or None)
            answers = self._answers(target_name, target, name, [p.message for p in problems],
                                    args.gsm8k_max_new_tokens)
            hits = sum(gsm8k_exact_match(answer, problem.answer)
                       for answer, problem in zip(answers, problems, strict=True))
            return _rate(name, hits, len(problems))
        if name == "humaneval":
            tasks = load_humaneval(capability_limit)
            answers = self._answers(target_name, target, name, [task.message for task in tasks],
                                    args.gsm8k_max_new_tokens)
            passed = sum(humaneval_pass(task, extract_code(answer)).passed
                         for task, answer in zip(tasks, answers, strict=True))
            return _rate(name, passed, len(tasks))
        # kl-benign, benign-nll: teacher-forced on the base model's own greedy answers.
        prompts = self.prompts(args.benign_reference)
        responses = self._answers("base", self.targets.base, args.benign_reference, prompts,
                                  args.max_new_tokens)
        if name == "benign-nll":
            with target() as model:
                average = gold_nll_per_token(model, self.tokenizer, prompts, responses,
                                             batch_size=args.score_batch_size)
        elif target_name == "base":
            return _mean(name, [0.0] * len(prompts), pooled=0.0)
        else:
            average = mean_kl_to_base(target, self.targets.base, self.tokenizer, prompts, responses,
                                      batch_size=args.score_batch_size)
        return _mean(name, average.per_item, pooled=average.mean, tokens=average.num_tokens)


def _safe_name(target: str) -> str:
    return "".join(char if char.isalnum() or char in "-_." else "_" for char in target)


def completions_dir(output_dir: str | Path, target: str) -> Path:
    """Where an evaluation in ``output_dir`` saves the answers of the target shown as ``target``."""
    return Path(output_dir) / "completions" / _safe_name(target)


def evaluate_targets(model_args: ModelArguments, data_args: DataArguments,
                     args: EvalArguments) -> dict[str, Any]:
    """Every target on every benchmark; writes results.json, results.md and the plots."""
    targets = Targets(args.targets, model_args, args.run_dir)
    evaluation = Evaluation(args, data_args, targets)
    results: dict[str, dict[str, Any]] = {name: {} for name in targets.names}
    seconds: dict[str, float] = {}
    for name in targets.names:
        target_started = time.perf_counter()
        with targets.session(name) as target:
            for benchmark in args.benchmarks:
                started = time.perf_counter()
                results[name][benchmark] = evaluation.score(name, target, benchmark)
                logger.info("%s / %s: %.4g in %.0f s", name, benchmark, results[name][benchmark]["value"],
                            time.perf_counter() - started)
        seconds[name] = round(time.perf_counter() - target_started, 1)
    summary = {"results": results, "benchmarks": {name: asdict(lookup(name)) for name in args.benchmarks},
               "summary": {name: target_summary(result) for name, result in results.items()},
               "judge": "keyword (safesteer.judge: first 200 characters), greedy decoding",
               "seconds": seconds, "settings": {"model": model_args.model, **asdict(args)}}
    output_dir = Path(args.output_dir)
    write_json(output_dir / RESULTS_FILE, summary)
    table = results_table(results, args.benchmarks) + "\n\n" + summary_table(summary["summary"])
    (output_dir / "results.md").write_text(table + "\n\n" + category_table(results) + "\n",
                                           encoding="utf-8")
    plot_results(summary, output_dir)
    print(table)
    if args.lm_eval_tasks:
        adapters = {name: Path(targets.paths[name]) for name in targets.adapters}
        script = write_handoff(output_dir, args.lm_eval_tasks, pretrained_location(model_args.model),
                               targets.direction, targets.model, adapters)
        print(f"lm-eval hand-off: sh {script}")
    return summary


def results_table(results: dict[str, dict[str, Any]], benchmarks: Sequence[str]) -> str:
    """Markdown: one row per benchmark, one column per target, value with its 95 % interval."""
    targets = list(results)
    lines = ["| benchmark | kind | metric | n | " + " | ".join(targets) + " |",
             "|---|---|---|---:|" + "---:|" * len(targets)]
    for name in benchmarks:
        benchmark = lookup(name)
        arrow = "↑" if benchmark.higher_is_better else "↓"
        cells = [_cell(results[target][name]) for target in targets]
        n = results[targets[0]][name]["n"]
        lines.append(f"| {name} | {benchmark.kind} | {benchmark.metric} {arrow} | {n} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def target_summary(results: Results) -> dict[str, Any]:
    """The worst case of each side, as a user meets it: the harmful set refused least, the benign
    set refused most, and harmful refusal per request style pooled over the harmful sets."""
    harmful, weakest = worst_of_kinds(results, HARMFUL_KINDS)
    over_refusal, worst = worst_of_kinds(results, ("over-refusal",))
    return {"harmful_refusal_min": harmful, "harmful_min_benchmark": weakest,
            "over_refusal_max": over_refusal, "over_refusal_max_benchmark": worst,
            "harmful_styles": pooled_styles(results, HARMFUL_KINDS)}


def summary_table(summaries: dict[str, dict[str, Any]]) -> str:
    """Markdown: per target the weakest harmful set, harmful refusal per style, the worst benign set."""
    def rate(value: float, where: str | None = None) -> str:
        return "n/a" if math.isnan(value) else f"{value:.1%}" + (f" ({where})" if where else "")

    lines = ["| target | harmful refusal, weakest set ↑ | question-style ↑ | instruction-style ↑ | "
             "over-refusal, worst benign set ↓ |", "|---|---:|---:|---:|---:|"]
    for name, summary in summaries.items():
        styles = summary["harmful_styles"]
        style_cells = [rate(styles[style]["value"]) + f" of {styles[style]['n']}" if style in styles
                       else "n/a" for style in ("question", "instruction")]
        lines.append(f"| {name} | {rate(summary['harmful_refusal_min'], summary['harmful_min_benchmark'])} | "
                     + " | ".join(style_cells) + " | "
                     + f"{rate(summary['over_refusal_max'], summary['over_refusal_max_benchmark'])} |")
    return "\n".join(lines)


def category_table(results: dict[str, dict[str, Any]]) -> str:
    """Markdown: refusal rate per category of every benchmark whose source records categories."""
    targets = list(results)
    lines = ["| benchmark | category | n | " + " | ".join(targets) + " |",
             "|---|---|---:|" + "---:|" * len(targets)]
    for name, row in results[targets[0]].items():
        for category, cell in row.get("categories", {}).items():
            rates = " | ".join(f"{results[t][name]['categories'][category]['value']:.0%}" for t in targets)
            lines.append(f"| {name} | {category} | {cell['n']} | {rates} |")
    return "\n".join(lines)


def _cell(result: dict[str, Any]) -> str:
    value, (low, high) = result["value"], result["ci"]
    if math.isnan(value):
        return "n/a"
    if result["metric"] in ("NLL / token", "KL / token"):
        return f"{value:.3f}" if math.isnan(low) else f"{value:.3f} [{low:.3f}, {high:.3f}]"
    return f"{value:.1%} [{low:.0%}, {high:.0%}]"
