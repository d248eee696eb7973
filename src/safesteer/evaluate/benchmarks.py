"""The benchmarks of ``safesteer eval``: what each measures, and the scorer that measures it.

Each :class:`Benchmark` carries its own scorer, a function of (the evaluation, the target's
display name, the target, the benchmark) returning the benchmark's ``results.json`` cell, so adding
a benchmark is adding one registry row; a name that is not registered is an error
(:func:`lookup`), never another benchmark's score. The scorers reach the model only through
:class:`~safesteer.evaluate.harness.Evaluation`, so this registry imports no torch and the options
of ``safesteer eval`` are read without it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from safesteer.data import PROMPT_SUFFIXES, prompt_categories, request_style
from safesteer.errors import SafesteerError
from safesteer.evaluate.grading import (
    correct_choices,
    extract_code,
    gsm8k_exact_match,
    mean_confidence_interval,
    wilson_interval,
)
from safesteer.evaluate.sandbox import humaneval_pass
from safesteer.gold import load_gsm8k, load_humaneval
from safesteer.keyword_judge import is_refusal

if TYPE_CHECKING:
    from safesteer.evaluate.capability import TokenAverage
    from safesteer.evaluate.config import EvalArguments
    from safesteer.evaluate.harness import Evaluation
    from safesteer.evaluate.targets import Target

Kind = Literal["safety", "jailbreak", "over-refusal", "robustness", "capability"]
Cell = dict[str, Any]
Scorer = Callable[["Evaluation", str, "Target", "Benchmark"], Cell]


@dataclass(frozen=True)
class Benchmark:
    """One row of the results table: what it measures, which direction is better, and its scorer."""

    name: str
    kind: Kind
    metric: str
    higher_is_better: bool
    description: str
    scorer: Scorer

    def score(self, evaluation: Evaluation, target_name: str, target: Target) -> Cell:
        """This benchmark's ``results.json`` cell for ``target`` (shown as ``target_name``)."""
        return self.scorer(evaluation, target_name, target, self)

    def record(self) -> dict[str, Any]:
        """What ``results.json`` records about the benchmark itself."""
        return {"name": self.name, "kind": self.kind, "metric": self.metric,
                "higher_is_better": self.higher_is_better, "description": self.description}


# ------------------------------------------------------------------------- results.json cells


def _row(benchmark: Benchmark, n: int, value: float, ci: Sequence[float], **extra: Any) -> Cell:
    """One results.json cell: the benchmark's kind and metric, the value and its 95 % interval."""
    return {"kind": benchmark.kind, "metric": benchmark.metric, "n": n, "value": value,
            "ci": list(ci), "higher_is_better": benchmark.higher_is_better, **extra}


def _rate(benchmark: Benchmark, successes: int, n: int, **extra: Any) -> Cell:
    return _row(benchmark, n, successes / n if n else math.nan, wilson_interval(successes, n), **extra)


def _mean(benchmark: Benchmark, values: Sequence[float], **extra: Any) -> Cell:
    mean, low, high = mean_confidence_interval(values)
    return _row(benchmark, len(values), mean, (low, high), **extra)


def _token_mean(benchmark: Benchmark, average: TokenAverage) -> Cell:
    return _mean(benchmark, average.per_item, pooled=average.mean, tokens=average.num_tokens)


def _by_category(categories: Sequence[str], refusals: Sequence[bool]) -> dict[str, dict[str, float]]:
    """Refusal rate and count per category, categories in alphabetical order."""
    groups: dict[str, list[bool]] = {}
    for category, refused in zip(categories, refusals, strict=True):
        groups.setdefault(category, []).append(refused)
    return {category: {"n": len(group), "value": sum(group) / len(group)}
            for category, group in sorted(groups.items())}


# ------------------------------------------------------------------------- scorers


def _refusals(evaluation: Evaluation, target_name: str, target: Target, benchmark: Benchmark) -> Cell:
    """Keyword-judged refusal rate of greedy answers, with the rate per category (for sources that
    record one) and per request style (harmful sets), and the LLM judge's verdict when given."""
    name = benchmark.name
    prompts = evaluation.prompts(name)
    answers = evaluation.answers(target_name, target, name, prompts, evaluation.args.max_new_tokens)
    refusals = [is_refusal(answer) for answer in answers]
    extra: dict[str, Any] = {}
    if name in evaluation.removed:
        extra["removed_near_training"] = evaluation.removed[name]
    categories = prompt_categories(name) if evaluation.data.data_source == "offline" else {}
    if categories:
        extra["categories"] = _by_category([categories.get(p.strip(), "other") for p in prompts],
                                         refusals)
    if benchmark.kind != "over-refusal":
        extra["styles"] = _by_category([request_style(prompt) for prompt in prompts], refusals)
    if evaluation.judge is not None:
        extra["judge"] = evaluation.judged(prompts, answers)
    return _rate(benchmark, sum(refusals), len(refusals), **extra)


def _attacked_refusals(evaluation: Evaluation, target_name: str, target: Target, benchmark: Benchmark,
                       settings: Callable[[EvalArguments], dict[str, Any]] | None = None) -> Cell:
    """Refusal of the --attack-prompts under the attack the benchmark names (docs/method.md §8.1),
    beside the same target's refusal of the same prompts unattacked and the drop between them;
    ``settings`` records what the attack was given."""
    source = evaluation.args.attack_prompts
    prompts = evaluation.prompts(source)
    unattacked = [is_refusal(answer) for answer in evaluation.answers(
        target_name, target, source, prompts, evaluation.args.max_new_tokens)]
    refusals = [is_refusal(answer) for answer in evaluation.answers(
        target_name, target, benchmark.name, prompts, evaluation.args.max_new_tokens, attack=benchmark.name)]
    before = sum(unattacked) / len(unattacked) if unattacked else math.nan
    after = sum(refusals) / len(refusals) if refusals else math.nan
    extra = {"attack": settings(evaluation.args)} if settings is not None else {}
    return _rate(benchmark, sum(refusals), len(refusals), prompts=source, unattacked=before,
                 drop=before - after, styles=_by_category([request_style(p) for p in prompts], refusals),
                 **extra)


def _finetune_settings(args: EvalArguments) -> dict[str, Any]:
    return {"steps": args.finetune_steps, "learning_rate": args.finetune_learning_rate,
            "lora_rank": args.finetune_rank,
            "data": f"the first {args.finetune_examples} direction-harmful-train prompts, each with a "
                    "compliant opener (stage 1's compliance templates)"}


def _letter_accuracy(evaluation: Evaluation, target_name: str, target: Target, benchmark: Benchmark,
                     subset: Literal["stem", "all"]) -> Cell:
    questions, scores = evaluation.letter_scores(target_name, target, subset)
    correct = correct_choices(scores, questions)
    return _rate(benchmark, sum(correct), len(correct))


def _letter_nll(evaluation: Evaluation, target_name: str, target: Target, benchmark: Benchmark) -> Cell:
    """The gold answer is one letter: its NLL is −log p(letter), from the mmlu-stem pass."""
    questions, scores = evaluation.letter_scores(target_name, target, "stem")
    return _mean(benchmark, [-row[q.answer] for row, q in zip(scores, questions, strict=True)])


def _gold_nll(evaluation: Evaluation, target: Target, benchmark: Benchmark, items: Sequence[Any]) -> Cell:
    """NLL per token of each item's ``reference`` after its ``message``, teacher-forced."""
    return _token_mean(benchmark, evaluation.gold_nll(target, [item.message for item in items],
                                                      [item.reference for item in items]))


def _gsm8k_nll(evaluation: Evaluation, target_name: str, target: Target, benchmark: Benchmark) -> Cell:
    return _gold_nll(evaluation, target, benchmark, load_gsm8k(evaluation.args.capability_limit or None))


def _humaneval_nll(evaluation: Evaluation, target_name: str, target: Target, benchmark: Benchmark) -> Cell:
    return _gold_nll(evaluation, target, benchmark,
                     load_humaneval(evaluation.args.capability_limit or None))


def _graded_answers(evaluation: Evaluation, target_name: str, target: Target, benchmark: Benchmark,
                    items: Sequence[Any], passes: Callable[[Any, str], bool]) -> Cell:
    """The share of ``items`` whose greedy answer to ``item.message`` ``passes``."""
    answers = evaluation.answers(target_name, target, benchmark.name, [item.message for item in items],
                                 evaluation.args.gsm8k_max_new_tokens)
    return _rate(benchmark, sum(passes(item, answer) for item, answer in zip(items, answers, strict=True)),
                 len(items))


def _gsm8k_exact_match(evaluation: Evaluation, target_name: str, target: Target,
                       benchmark: Benchmark) -> Cell:
    return _graded_answers(evaluation, target_name, target, benchmark,
                           load_gsm8k(evaluation.args.gsm8k_limit or None),
                           lambda problem, answer: gsm8k_exact_match(answer, problem.answer))


def _humaneval_pass(evaluation: Evaluation, target_name: str, target: Target,
                    benchmark: Benchmark) -> Cell:
    return _graded_answers(evaluation, target_name, target, benchmark,
                           load_humaneval(evaluation.args.capability_limit or None),
                           lambda task, answer: humaneval_pass(task, extract_code(answer)).passed)


def _kl_benign(evaluation: Evaluation, target_name: str, target: Target, benchmark: Benchmark) -> Cell:
    """KL(target‖base) per token, teacher-forced on the base model's own benign answers."""
    if target_name == "base":
        return _mean(benchmark, [0.0] * len(evaluation.benign_answers()[0]), pooled=0.0)
    return _token_mean(benchmark, evaluation.benign_measures(target_name, target)[0])


def _benign_nll(evaluation: Evaluation, target_name: str, target: Target, benchmark: Benchmark) -> Cell:
    """NLL per token of the base model's own benign answers."""
    return _token_mean(benchmark, evaluation.benign_nll(target_name, target))


# ------------------------------------------------------------------------- the registry


def _refusal(name: str, kind: Kind, description: str) -> Benchmark:
    return Benchmark(name, kind, "refusal rate", kind != "over-refusal", description, _refusals)


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
    Benchmark("direction-ablation", "robustness", "refusal rate", True,
              "--attack-prompts with the run's direction projected out of every block's input and "
              "output", _attacked_refusals),
    Benchmark("own-direction-ablation", "robustness", "refusal rate", True,
              "--attack-prompts with the target's own refusal direction (difference of means, train "
              "prompts) projected out everywhere", _attacked_refusals),
    Benchmark("prefill", "robustness", "refusal rate", True,
              "--attack-prompts with a compliant opener pre-filled in the answer; refusal = the "
              "model turns back", _attacked_refusals),
    Benchmark("harmful-finetune", "robustness", "refusal rate", True,
              "--attack-prompts after --finetune-steps LoRA steps on harmful request/compliance "
              "pairs (off by default)", partial(_attacked_refusals, settings=_finetune_settings)),
    Benchmark("mmlu-stem", "capability", "accuracy", True, "MMLU STEM, zero-shot letter likelihood",
              partial(_letter_accuracy, subset="stem")),
    Benchmark("mmlu", "capability", "accuracy", True, "MMLU, all subjects, zero-shot letter likelihood",
              partial(_letter_accuracy, subset="all")),
    Benchmark("mmlu-nll", "capability", "NLL / token", False,
              "NLL of the MMLU-STEM gold letter (the same pass as mmlu-stem)", _letter_nll),
    Benchmark("gsm8k-nll", "capability", "NLL / token", False, "NLL of GSM8K reference solutions",
              _gsm8k_nll),
    Benchmark("humaneval-nll", "capability", "NLL / token", False,
              "NLL of HumanEval canonical solutions", _humaneval_nll),
    Benchmark("gsm8k", "capability", "exact match", True, "GSM8K (offline 100), greedy",
              _gsm8k_exact_match),
    Benchmark("humaneval", "capability", "pass@1", True, "HumanEval, greedy, sandboxed execution",
              _humaneval_pass),
    Benchmark("kl-benign", "capability", "KL / token", False,
              "KL(target || base) on the base model's answers to the ordinary requests", _kl_benign),
    Benchmark("benign-nll", "capability", "NLL / token", False,
              "NLL of the base model's own answers to the ordinary requests", _benign_nll),
)}
# The test halves only: settings are chosen on the validation halves (docs/data.md §5).
DEFAULT_BENCHMARKS = ["harmbench-test", "jbb", "strongreject", "advbench-test", "donotanswer-test",
                      "borderline-unsafe-test", "jbb-past-tense", "xstest-proxy", "harmless-test",
                      "ordinary-test", "borderline-test", "direction-ablation", "prefill", "mmlu-stem",
                      "mmlu-nll", "gsm8k-nll", "humaneval-nll", "gsm8k", "kl-benign", "benign-nll"]
# Benchmarks that read the direction of --run-dir.
RUN_DIRECTION_BENCHMARKS = ("direction-ablation",)


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
