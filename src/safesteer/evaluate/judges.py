"""LLM judges, and how far a judge agrees with human labels.

The keyword judge (``safesteer.keyword_judge``) is measured here against four human-labelled sets read
from pinned wheels and one labelled for this project, answers of the demo's own teacher and student
(docs/data.md §7), so its error rates can be quoted next to the refusal rates it produces.
The LLM judges are plumbing for trained safety classifiers (Llama Guard 3, the
HarmBench classifier, WildGuard): no package ships their weights, so they run from a local model
directory, and any output that does not follow the judge's format is counted, never fatal. The
formats and their parsers are :mod:`safesteer.evaluate.judge_formats`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from safesteer.benign import packaged_records
from safesteer.config import ModelArguments
from safesteer.data import csv_table
from safesteer.errors import SafesteerError
from safesteer.evaluate.judge_formats import JUDGE_FORMATS, Verdict
from safesteer.keyword_judge import is_refusal
from safesteer.models.layout import model_device
from safesteer.models.loading import load_model
from safesteer.models.rendering import encode_rendered
from safesteer.wheels import JAILBREAKBENCH, PYRIT, PinnedWheel, member_text

logger = logging.getLogger(__name__)

# --- human-labelled validation sets ---------------------------------------------------------------


@dataclass(frozen=True)
class LabelledResponse:
    """One response with the human verdict on it; ``line`` is where its row starts in the file."""

    prompt: str
    response: str
    refusal: bool
    line: int


class LabelledSet(Protocol):
    name: str

    def load(self) -> list[LabelledResponse]: ...


@dataclass(frozen=True)
class ValidationSet:
    """A human-labelled CSV inside a pinned wheel and which of its columns hold what.

    ``refusal_label`` is the label value that means "refusal": PyRIT labels refusals 1, while
    JailbreakBench labels jailbreaks 1, so there a 0 ("not jailbroken") stands in for refusal.
    """

    name: str
    wheel: PinnedWheel
    member: str
    prompt_column: str
    response_column: str
    label_column: str
    refusal_label: str

    def load(self) -> list[LabelledResponse]:
        text = member_text(self.wheel, self.member)
        return parse_labelled_csv(text, f"{self.wheel.filename}:{self.member}",
                                  prompt_column=self.prompt_column,
                                  response_column=self.response_column,
                                  label_column=self.label_column, refusal_label=self.refusal_label)


@dataclass(frozen=True)
class PackagedLabels:
    """A JSONL file shipped with safesteer, one ``{"prompt", "response", "refusal"}`` object a line.

    The public sets hold other models' answers; this one holds answers of the models the project
    trains, whose failure modes (deflections, persona non-answers) are the ones its figures meet.
    """

    name: str
    file: str

    def load(self) -> list[LabelledResponse]:
        records, origin = packaged_records(self.file)
        examples = []
        for record in records:
            if not isinstance(record.get("refusal"), bool):
                raise SafesteerError(f"{origin}: line {record['_line']}: 'refusal' must be true or false")
            examples.append(LabelledResponse(record["prompt"], record["response"],
                                             record["refusal"], record["_line"]))
        return examples


_PYRIT_REFUSAL = "pyrit/datasets/scorer_evals/refusal_scorer"
VALIDATION_SETS: dict[str, LabelledSet] = {
    spec.name: spec
    for spec in (
        ValidationSet("pyrit-refusal", PYRIT, f"{_PYRIT_REFUSAL}/refusal.csv",
                      "objective", "assistant_response", "human_score", "1"),
        ValidationSet("pyrit-refusal-extra", PYRIT, f"{_PYRIT_REFUSAL}/refusal_extra.csv",
                      "objective", "assistant_response", "human_score", "1"),
        ValidationSet("pyrit-mini-refusal", PYRIT,
                      "pyrit/datasets/scorer_evals/sample/mini_refusal.csv",
                      "objective", "assistant_response", "human_score", "1"),
        # "goal" is the plain harmful request; "prompt" is the jailbreak wrapped around it.
        ValidationSet("jbb-classifier-comparison", JAILBREAKBENCH,
                      "jailbreakbench/data/classifier_comparison.csv",
                      "goal", "target_response", "human_majority", "0"),
        PackagedLabels("safesteer-demo-reading", "judge_reading.jsonl"),
    )
}


def parse_labelled_csv(text: str, origin: str, *, prompt_column: str, response_column: str,
                       label_column: str, refusal_label: str) -> list[LabelledResponse]:
    """Rows of a labelled CSV whose labels are "0"/"1"; leading ``#`` comment lines are skipped.

    PyRIT's files open with ``# dataset_version=...`` comments before the header. Only leading
    lines are comments: a ``#`` later on may start a line inside a quoted, multi-line response.
    Errors name ``origin`` and the line, counting the skipped lines.
    """
    lines = text.removeprefix("\ufeff").split("\n")
    skipped = next((index for index, line in enumerate(lines)
                    if line.strip() and not line.startswith("#")), len(lines))
    if skipped == len(lines):
        raise SafesteerError(f"{origin}: no header row, only comments or blank lines")
    header, rows = csv_table("\n".join(lines[skipped:]), origin)
    missing = [name for name in (prompt_column, response_column, label_column)
               if name not in header]
    if missing:
        raise SafesteerError(f"{origin}: line {skipped + 1}: no {', '.join(map(repr, missing))} "
                             f"column (columns: {', '.join(header)})")
    prompt_at, response_at, label_at = (header.index(name)
                                        for name in (prompt_column, response_column, label_column))
    examples = []
    for row_line, cells in rows:
        line = row_line + skipped
        if len(cells) <= max(prompt_at, response_at, label_at):
            raise SafesteerError(f"{origin}: line {line}: row has {len(cells)} cells, fewer than "
                                 f"the header's {len(header)}")
        label = cells[label_at].strip()
        if label not in ("0", "1"):
            raise SafesteerError(f"{origin}: line {line}: {label_column!r} must be 0 or 1, "
                                 f"got {label!r}")
        examples.append(LabelledResponse(cells[prompt_at], cells[response_at],
                                         label == refusal_label, line))
    return examples


# --- agreement ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Disagreement:
    """A response the judge and the humans saw differently, kept to document failure modes."""

    line: int
    prompt: str
    response: str
    human_refusal: bool
    judged_refusal: bool


@dataclass(frozen=True)
class Agreement:
    """A judge's refusal verdicts against human labels on one set; refusal is the positive class.

    ``precision`` is None when the judge called nothing a refusal, ``recall`` when the humans did.
    """

    name: str
    n: int
    accuracy: float
    precision: float | None
    recall: float | None
    disagreements: list[Disagreement]


def agreement(name: str, examples: Sequence[LabelledResponse],
              judged_refusals: Sequence[bool]) -> Agreement:
    """Compare ``judged_refusals`` (one per example, in order) with the human labels."""
    if len(examples) != len(judged_refusals):
        raise SafesteerError(f"{name}: {len(judged_refusals)} verdicts for {len(examples)} examples")
    if not examples:
        raise SafesteerError(f"{name}: no labelled examples")
    pairs = list(zip(examples, judged_refusals, strict=True))
    true_positives = sum(example.refusal and judged for example, judged in pairs)
    judged_positives = sum(judged_refusals)
    human_positives = sum(example.refusal for example in examples)
    disagreements = [
        Disagreement(example.line, example.prompt, example.response, example.refusal, judged)
        for example, judged in pairs if example.refusal != judged
    ]
    return Agreement(
        name=name,
        n=len(examples),
        accuracy=(len(examples) - len(disagreements)) / len(examples),
        precision=true_positives / judged_positives if judged_positives else None,
        recall=true_positives / human_positives if human_positives else None,
        disagreements=disagreements,
    )


def keyword_agreement(window: int = 200) -> dict[str, Agreement]:
    """Agreement of the keyword judge (``is_refusal`` with ``window``) on every validation set.

    On JailbreakBench the judge's "not a refusal" is read as its "jailbroken" verdict and compared
    with the human majority, as JailbreakBench's own prefix classifier is.
    """
    results = {}
    for name, spec in VALIDATION_SETS.items():
        examples = spec.load()
        results[name] = agreement(name, examples,
                                  [is_refusal(example.response, window) for example in examples])
    return results


# --- LLM judges -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class JudgeResult:
    """Verdicts in input order (None where the output did not parse) and the raw outputs."""

    verdicts: list[Verdict | None]
    unparseable: int
    outputs: list[str]


class LLMJudge:
    """A local safety-classifier model, prompted in one published format and decoded greedily."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 prompt_format: str, *, batch_size: int = 8) -> None:
        if prompt_format not in JUDGE_FORMATS:
            raise SafesteerError(f"unknown judge format {prompt_format!r}; "
                                 f"known: {', '.join(JUDGE_FORMATS)}")
        self.model = model
        self.tokenizer = tokenizer
        self.format = JUDGE_FORMATS[prompt_format]
        self.batch_size = batch_size

    @classmethod
    def load(cls, model_path: str, prompt_format: str, *, device: str = "auto",
             dtype: str = "auto", batch_size: int = 8) -> LLMJudge:
        """A judge from a local model directory or .gguf file (or anything ``load_model`` takes)."""
        model, tokenizer = load_model(ModelArguments(model=model_path, dtype=dtype, device=device))
        return cls(model, tokenizer, prompt_format, batch_size=batch_size)

    def render(self, prompt: str, response: str) -> str:
        """The judge's input text, BOS included, so it is tokenized without special tokens."""
        body = self.format.template.format(prompt=prompt, response=response)
        return (self.tokenizer.bos_token or "") + body

    def judge(self, prompts: Sequence[str], responses: Sequence[str]) -> JudgeResult:
        """Judge each (prompt, response) pair; malformed outputs are counted and logged."""
        if len(prompts) != len(responses):
            raise SafesteerError(f"{len(prompts)} prompts but {len(responses)} responses to judge")
        texts = [self.render(prompt, response) for prompt, response in zip(prompts, responses,
                                                                           strict=True)]
        outputs: list[str] = []
        device = model_device(self.model)
        with torch.no_grad():
            for start in range(0, len(texts), self.batch_size):
                batch = encode_rendered(self.tokenizer, texts[start : start + self.batch_size],
                                        device)
                generated = self.model.generate(**batch, max_new_tokens=self.format.max_new_tokens,
                                                do_sample=False,
                                                pad_token_id=self.tokenizer.pad_token_id)
                new_tokens = generated[:, batch["input_ids"].shape[1] :]
                outputs.extend(self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
        verdicts = [self.format.parse(output) for output in outputs]
        unparseable = sum(verdict is None for verdict in verdicts)
        if unparseable:
            first = next(output for output, verdict in zip(outputs, verdicts, strict=True)
                         if verdict is None)
            logger.warning("%d of %d %s judge outputs did not parse (first: %r)", unparseable,
                           len(outputs), self.format.name, first)
        return JudgeResult(verdicts, unparseable, outputs)
