"""``safesteer eval``: base, steered teacher and student scored identically, side by side.

Every target answers the same prompts with the same greedy decoding and is judged by the same
judge; capability measures are teacher-forced on the same gold answers. Completions are saved as
JSONL, one file per target and benchmark, with the settings that made them, so a rerun (or a
resumed run) reuses those of unchanged targets and only generates what is missing; the numbers
are recomputed from the saved files each time. The options are :mod:`safesteer.evaluate.config`,
the benchmarks and their scorers :mod:`safesteer.evaluate.benchmarks`, the targets
:mod:`safesteer.evaluate.targets`, the Markdown tables :mod:`safesteer.evaluate.tables`.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch

from safesteer.config import DataArguments, ModelArguments
from safesteer.data import remove_near
from safesteer.direction import Direction
from safesteer.errors import SafesteerError
from safesteer.evaluate.attacks import (
    compliance_answers,
    harmful_finetune,
    own_direction_layer,
    own_refusal_direction,
    prefill_prefixes,
)
from safesteer.evaluate.benchmarks import lookup
from safesteer.evaluate.capability import (
    TokenAverage,
    choice_logprobs,
    gold_nll_per_token,
    kl_to_base_and_nll,
)
from safesteer.evaluate.config import EvalArguments
from safesteer.evaluate.judges import LLMJudge
from safesteer.evaluate.lm_eval import write_handoff
from safesteer.evaluate.summary import build_summary, write_summary
from safesteer.evaluate.targets import Target, Targets
from safesteer.gold import MultipleChoiceQuestion, load_mmlu
from safesteer.io import atomic_write
from safesteer.models.devices import peak_memory_mib
from safesteer.models.generation import generate_responses
from safesteer.models.layout import model_device, num_layers
from safesteer.models.loading import pretrained_location
from safesteer.models.precision import BfloatProducts, generation_dtype_name, resolve_generation_dtype
from safesteer.software import software
from safesteer.steering import ablate_direction

logger = logging.getLogger(__name__)

# ------------------------------------------------------------------------- completions


def _completions(path: Path, prompts: list[str], generate: Callable[[list[str]], list[str]],
                 chunk: int, settings: dict[str, Any]) -> list[str]:
    """Answers to ``prompts``: those saved in ``path`` (JSONL) with the same ``settings`` are
    reused, the rest generated ``chunk`` at a time and appended after each chunk, so a killed
    evaluation loses at most one chunk and resumes where it stopped. Answers saved with other
    settings (another student, answer length or generation dtype) are dropped from the file."""
    saved: dict[str, str] = {}
    stale = 0
    if path.is_file():
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            try:
                record = json.loads(line)
                prompt, response = record["prompt"], record["response"]
            except (json.JSONDecodeError, KeyError, TypeError):
                logger.warning("%s: line %d is not a saved completion; it will be regenerated",
                               path, number)
                continue
            if record.get("settings") == settings:
                saved[prompt] = response
            else:
                stale += 1
    if stale:
        logger.warning("%s: %d saved answers were made with other settings than %s; they are "
                       "dropped and regenerated", path, stale, json.dumps(settings))
        kept = "".join(_record(prompt, answer, settings) + "\n" for prompt, answer in saved.items())
        atomic_write(path, lambda tmp: tmp.write_text(kept, encoding="utf-8"))
    missing = [prompt for prompt in dict.fromkeys(prompts) if prompt not in saved]
    if missing:
        path.parent.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(missing), chunk):
        batch = missing[start:start + chunk]
        answers = generate(batch)
        with path.open("a", encoding="utf-8") as file:
            for prompt, answer in zip(batch, answers, strict=True):
                file.write(_record(prompt, answer, settings) + "\n")
                saved[prompt] = answer
    return [saved[prompt] for prompt in prompts]


def _record(prompt: str, response: str, settings: dict[str, Any]) -> str:
    return json.dumps({"prompt": prompt, "response": response, "settings": settings})


class Evaluation:
    """One ``safesteer eval`` invocation: prompt sets are loaded once and shared by every target."""

    def __init__(self, args: EvalArguments, data_args: DataArguments, targets: Targets) -> None:
        self.args = args
        self.data = data_args
        self.targets = targets
        self.tokenizer = targets.tokenizer
        self.completions = args.completions_path()
        self.removed: dict[str, int] = {}
        self._prompt_sets: dict[str, list[str]] = {}
        self._references: list[str] | None = None
        self._letters: dict[tuple[str, str], tuple[list[MultipleChoiceQuestion], list[list[float]]]] = {}
        self._own_directions: dict[str, torch.Tensor] = {}
        self._benign: dict[str, tuple[TokenAverage, TokenAverage]] = {}
        weights = next(targets.model.parameters()).dtype
        self.score_dtype = resolve_generation_dtype(args.score_dtype, weights, model_device(targets.model))
        self.score_dtype_name = str(self.score_dtype or weights).removeprefix("torch.")
        self._score_mode: BfloatProducts | None = None
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

    def _generate(self, target: Target, label: str, max_new_tokens: int,
                  ablated: Callable[[], torch.Tensor] | None = None,
                  prefill: bool = False) -> Callable[[list[str]], list[str]]:
        """Greedy answers of ``target``; with ``ablated`` the direction it returns removed from the
        residual stream, with ``prefill`` each answer started by a compliant opener."""
        def generate(prompts: list[str]) -> list[str]:
            vector = ablated() if ablated is not None else None  # before the target is entered
            prefixes = prefill_prefixes(prompts, self.args.eval_seed) if prefill else None
            with target() as model, (nullcontext() if vector is None else ablate_direction(model, vector)):
                return generate_responses(model, self.tokenizer, prompts, max_new_tokens=max_new_tokens,
                                          batch_size=self.args.eval_batch_size, desc=label,
                                          prefixes=prefixes)
        return generate

    def answers(self, target_name: str, target: Target, benchmark: str, prompts: list[str],
                max_new_tokens: int, attack: str | None = None) -> list[str]:
        """The target's greedy answers, reused from (and saved to) its completions file; under
        ``attack`` (a robustness benchmark's name) when given."""
        path = self.completions / _safe_name(target_name) / f"{_safe_name(benchmark)}.jsonl"
        ablations = {"direction-ablation": self._run_vector,
                     "own-direction-ablation": partial(self.own_direction, target_name, target)}
        ablated = ablations.get(attack) if attack else None
        label = f"{target_name}: {benchmark}"
        settings = self._answer_settings(target_name, max_new_tokens, attack)
        if attack == "harmful-finetune":  # one fine-tuned copy answers every prompt
            return _completions(path, prompts, self._finetuned(target_name, label, max_new_tokens),
                                chunk=max(len(prompts), 1), settings=settings)
        generate = self._generate(target, label, max_new_tokens, ablated, prefill=attack == "prefill")
        return _completions(path, prompts, generate, chunk=4 * self.args.eval_batch_size,
                            settings=settings)

    def _answer_settings(self, target_name: str, max_new_tokens: int,
                         attack: str | None) -> dict[str, Any]:
        """What a saved answer must have been made with to be reused: the same target (its
        weights, adapter and direction files), length, generation dtype and attack settings."""
        settings: dict[str, Any] = {"target": self.targets.identity(target_name),
                                    "max_new_tokens": max_new_tokens,
                                    "generation_dtype": generation_dtype_name(self.targets.model)}
        args = self.args
        attack_settings = {
            "direction-ablation": lambda: {"direction": self.targets.run_direction_identity},
            "own-direction-ablation": lambda: {"prompts": args.own_direction_prompts},
            "prefill": lambda: {"seed": args.eval_seed},
            "harmful-finetune": lambda: {
                "seed": args.eval_seed, "steps": args.finetune_steps, "examples": args.finetune_examples,
                "learning_rate": args.finetune_learning_rate, "rank": args.finetune_rank},
        }
        if attack is not None:
            settings["attack"] = {"name": attack, **attack_settings.get(attack, dict)()}
        return settings

    def _finetuned(self, target_name: str, label: str,
                   max_new_tokens: int) -> Callable[[list[str]], list[str]]:
        """Greedy answers of a copy of the target fine-tuned on harmful request/compliance pairs
        (the first --finetune-examples stage-1 training prompts), served as the target is."""
        def generate(prompts: list[str]) -> list[str]:
            harmful = self.data.load("direction-harmful-train", None)[:self.args.finetune_examples]
            model = self.targets.load_copy(target_name)
            tuned, losses = harmful_finetune(
                model, self.tokenizer, harmful, compliance_answers(len(harmful)),
                steps=self.args.finetune_steps, learning_rate=self.args.finetune_learning_rate,
                rank=self.args.finetune_rank, batch_size=self.args.score_batch_size, seed=self.args.eval_seed)
            logger.info("%s: fine-tuned %d steps on %d harmful pairs, loss %.3g -> %.3g", target_name,
                        len(losses), len(harmful), losses[0], losses[-1])
            with self.targets.served(target_name, tuned):
                return generate_responses(tuned, self.tokenizer, prompts, max_new_tokens=max_new_tokens,
                                          batch_size=self.args.eval_batch_size, desc=label)
        return generate

    def _run_vector(self) -> torch.Tensor:
        direction = self.run_direction()
        if direction is None:
            raise SafesteerError("direction-ablation needs --run-dir (the run whose direction it removes)")
        return direction.vector

    def run_direction(self) -> Direction | None:
        """The steering direction of --run-dir (None without a run): direction-ablation removes it,
        and its layer is where own-direction-ablation reads the target's own direction."""
        if self.targets.direction is None and self.args.run_dir is not None:
            self.targets.direction = Direction.load(self.args.run_dir)
        return self.targets.direction

    def own_direction(self, target_name: str, target: Target) -> torch.Tensor:
        """The target's own refusal direction, from the stage-1 training prompts only (never the
        evaluated ones), extracted once per target."""
        if target_name not in self._own_directions:
            count = self.args.own_direction_prompts
            harmful = self.data.load("direction-harmful-train", None)[:count]
            harmless = self.data.load("direction-harmless-train", None)[:count]
            with target() as model:
                total = num_layers(model)
                layer = self.args.own_direction_layer
                if layer is None:
                    run_direction = self.run_direction()
                    layer = own_direction_layer(total, run_direction.layer if run_direction else None)
                if layer >= total:
                    raise SafesteerError(f"--own-direction-layer {layer}: {target_name} has {total} "
                                         f"blocks (0..{total - 1})")
                self._own_directions[target_name] = own_refusal_direction(
                    model, self.tokenizer, harmful, harmless, layer, self.args.score_batch_size)
            logger.info("%s: own refusal direction at block %d, norm %.3g", target_name, layer,
                        self._own_directions[target_name].norm().item())
        return self._own_directions[target_name]

    def judged(self, prompts: list[str], answers: list[str]) -> dict[str, Any]:
        """The LLM judge's share of harmful responses among the verdicts that parsed."""
        assert self.judge is not None
        result = self.judge.judge(prompts, answers)
        harmful = [verdict.harmful for verdict in result.verdicts if verdict is not None]
        return {"format": self.args.judge_format, "n_parsed": len(harmful),
                "unparseable": result.unparseable,
                "harmful_rate": sum(harmful) / len(harmful) if harmful else math.nan}

    def letter_scores(self, target_name: str, target: Target, subset: Literal["stem", "all"],
                      ) -> tuple[list[MultipleChoiceQuestion], list[list[float]]]:
        """MMLU answer-letter log-probabilities, computed once per target for accuracy and NLL."""
        key = (target_name, subset)
        if key not in self._letters:
            questions = load_mmlu(subset, self.args.capability_limit or None, seed=self.args.eval_seed)
            with target() as model, torch.inference_mode(), self.scoring():
                scores = choice_logprobs(model, self.tokenizer, questions,
                                         batch_size=self.args.score_batch_size)
            self._letters[key] = (questions, scores)
        return self._letters[key]

    def gold_nll(self, target: Target, prompts: list[str], references: list[str]) -> TokenAverage:
        """NLL per token of each reference answer after its prompt, teacher-forced."""
        with self.scoring():
            return gold_nll_per_token(target, self.tokenizer, prompts, references,
                                      batch_size=self.args.score_batch_size)

    def benign_measures(self, target_name: str, target: Target) -> tuple[TokenAverage, TokenAverage]:
        """The target's KL to the base (kl-benign) and NLL (benign-nll) per token on the base's
        benign answers, from one pass of each model, made once per target."""
        if target_name not in self._benign:
            prompts, responses = self.benign_answers()
            with self.scoring():
                self._benign[target_name] = kl_to_base_and_nll(
                    target, self.targets.base, self.tokenizer, prompts, responses,
                    batch_size=self.args.score_batch_size)
        return self._benign[target_name]

    def benign_nll(self, target_name: str, target: Target) -> TokenAverage:
        """benign-nll: kl-benign's pass gives it where that is evaluated too; the base's own
        KL is 0, so its NLL takes a pass of its own, as without kl-benign."""
        if target_name != "base" and "kl-benign" in self.args.benchmarks:
            return self.benign_measures(target_name, target)[1]
        return self.gold_nll(target, *self.benign_answers())

    def scoring(self) -> AbstractContextManager[Any]:
        """The products of the teacher-forced measures: bfloat16 ones under --score-dtype bfloat16
        (or auto on a CPU with native bfloat16), the weights' own otherwise (docs/method.md §8)."""
        if self.score_dtype != torch.bfloat16:
            return nullcontext()
        return self._score_mode or BfloatProducts()

    @contextmanager
    def target_copies(self) -> Iterator[None]:
        """Within it, the teacher-forced measures share one set of bfloat16 weight copies (those
        of the target and of the base), made on first use and freed at the end: one target's."""
        self._score_mode = BfloatProducts() if self.score_dtype == torch.bfloat16 else None
        try:
            yield
        finally:
            self._score_mode = None

    def benign_answers(self) -> tuple[list[str], list[str]]:
        """The --benign-reference prompts and the base model's greedy answers to them, which
        kl-benign and benign-nll score every target on."""
        prompts = self.prompts(self.args.benign_reference)
        return prompts, self.answers("base", self.targets.base, self.args.benign_reference, prompts,
                                     self.args.max_new_tokens)

    def score(self, target_name: str, target: Target, name: str) -> dict[str, Any]:
        """Benchmark ``name``'s results.json cell for ``target``, by the benchmark's own scorer."""
        return lookup(name).score(self, target_name, target)


def _safe_name(target: str) -> str:
    return "".join(char if char.isalnum() or char in "-_." else "_" for char in target)


def evaluate_targets(model_args: ModelArguments, data_args: DataArguments,
                     args: EvalArguments) -> dict[str, Any]:
    """Every target on every benchmark; writes results.json, results.md and the plots."""
    targets = Targets(args.targets, model_args, args.run_dir)
    evaluation = Evaluation(args, data_args, targets)
    results: dict[str, dict[str, Any]] = {name: {} for name in targets.names}
    seconds: dict[str, float] = {}
    memory: dict[str, dict[str, float | None]] = {}
    for name in targets.names:
        target_started = time.perf_counter()
        with targets.session(name) as target, evaluation.target_copies():
            for benchmark in args.benchmarks:
                started = time.perf_counter()
                results[name][benchmark] = evaluation.score(name, target, benchmark)
                logger.info("%s / %s: %.4g in %.0f s", name, benchmark, results[name][benchmark]["value"],
                            time.perf_counter() - started)
        seconds[name] = round(time.perf_counter() - target_started, 1)
        memory[name] = peak_memory_mib(model_device(targets.model))
    summary = build_summary(results, seconds, memory, args.benchmarks, {
        "model": model_args.model, **asdict(args), "generation_dtype": generation_dtype_name(targets.model),
        "score_dtype": evaluation.score_dtype_name}, dict.fromkeys(targets.names, software()))
    write_summary(summary, args.output_dir)
    if args.lm_eval_tasks:
        adapters = {name: Path(targets.paths[name]) for name in targets.adapters}
        script = write_handoff(Path(args.output_dir), args.lm_eval_tasks,
                               pretrained_location(model_args.model), targets.direction, targets.model,
                               adapters)
        print(f"lm-eval hand-off: sh {script}")
    return summary
