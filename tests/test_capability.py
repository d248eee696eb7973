"""safesteer.evaluate.capability and .grading: scoring on tiny random models, pure helpers by hand;
the real benchmark wheels only under ``-m integration``."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from itertools import pairwise

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from safesteer import gold
from safesteer.direction import Direction, Gate
from safesteer.divergence import divergence
from safesteer.errors import SafesteerError
from safesteer.evaluate.capability import (
    choice_letter_ids,
    choice_logprobs,
    gold_nll_per_token,
    kl_to_base_and_nll,
    multiple_choice_accuracy,
)
from safesteer.evaluate.grading import (
    extract_code,
    extract_final_number,
    gsm8k_exact_match,
    mean_confidence_interval,
    wilson_interval,
)
from safesteer.evaluate.sandbox import humaneval_pass
from safesteer.evaluate.targets import ConditionalTeacher
from safesteer.gold import (
    MMLU_STEM_SUBJECTS,
    GSM8KProblem,
    MultipleChoiceQuestion,
    load_gsm8k,
    load_humaneval,
    load_mmlu,
)
from safesteer.models.rendering import render_prompts
from safesteer.steering import block_input_at_last_position

ModelFactory = Callable[[str], PreTrainedModel]

QUESTIONS = [
    MultipleChoiceQuestion("What colour is the sky on a clear day?", ("red", "blue", "green", "black"),
                           1, "astronomy"),
    MultipleChoiceQuestion("2 + 2 =", ("3", "4", "5", "22"), 1, "elementary mathematics"),
    MultipleChoiceQuestion("Which of these is a prime number, given that a prime has exactly two "
                           "divisors, one and itself?", ("4", "6", "7", "9"), 2,
                           "elementary mathematics"),
    MultipleChoiceQuestion("Pick D.", ("no", "no", "no", "yes"), 3, "machine learning"),
    MultipleChoiceQuestion("Pick A.", ("yes", "no", "no", "no"), 0, "machine learning"),
]
PROMPTS = ["Write a poem.", "Explain tides to a child in three sentences, please.", "Hi", "Plan a picnic."]
ANSWERS = ["The cat writes a poem today.", "a map", "", "our team plans the weekly schedule (again), "
           "said Ann; yes. Then my neighbour finds a bicycle."]


def target(model: nn.Module) -> Callable[[], nullcontext[nn.Module]]:
    return lambda: nullcontext(model)


def naive_answer_logprobs(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompt: str,
                          answer: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 log-probs [answer tokens, vocab] at the positions predicting ``answer`` and its ids,
    from one unpadded forward pass over prompt ‖ answer."""
    prompt_ids = tokenizer(render_prompts(tokenizer, [prompt])[0], add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt_ids + answer_ids])).logits[0].double()
    positions = range(len(prompt_ids) - 1, len(prompt_ids) + len(answer_ids) - 1)
    return logits[list(positions)].log_softmax(-1), torch.tensor(answer_ids)


# --- multiple choice ------------------------------------------------------------------------------


def test_choice_letter_ids_are_the_bare_letters(tiny_tokenizer: PreTrainedTokenizerBase) -> None:
    ids = choice_letter_ids(tiny_tokenizer)
    assert tiny_tokenizer.convert_ids_to_tokens(ids) == ["A", "B", "C", "D"]


class _LetterTokenizer:
    """Just enough of a tokenizer for ``choice_letter_ids``: fixed ids per letter."""

    def __init__(self, ids: dict[str, list[int]]) -> None:
        self.ids = ids

    def __call__(self, text: str, add_special_tokens: bool) -> dict[str, list[int]]:
        return {"input_ids": self.ids[text]}


@pytest.mark.parametrize(
    ("ids", "message"),
    [({"A": [1], "B": [2, 3], "C": [4], "D": [5]}, "'B' is 2 tokens"),
     ({"A": [1], "B": [2], "C": [1], "D": [5]}, "share token ids")],
)
def test_choice_letter_ids_need_one_distinct_token_per_letter(ids: dict[str, list[int]],
                                                              message: str) -> None:
    with pytest.raises(SafesteerError, match=message):
        choice_letter_ids(_LetterTokenizer(ids))  # type: ignore[arg-type]


@pytest.mark.parametrize("favoured", [0, 2])
def test_multiple_choice_accuracy_follows_the_letter_logit(
    tiny_model: PreTrainedModel, tiny_tokenizer: PreTrainedTokenizerBase, favoured: int
) -> None:
    """A large bias on one letter's logit makes exactly the questions with that answer correct."""
    letter_id = choice_letter_ids(tiny_tokenizer)[favoured]

    def favour(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        output[..., letter_id] += 50.0
        return output

    handle = tiny_model.get_output_embeddings().register_forward_hook(favour)
    try:
        correct = multiple_choice_accuracy(tiny_model, tiny_tokenizer, QUESTIONS, batch_size=2)
    finally:
        handle.remove()
    assert correct == [question.answer == favoured for question in QUESTIONS]


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2"])
def test_choice_logprobs_batched_match_unpadded_passes(
    make_tiny_model: ModelFactory, tiny_tokenizer: PreTrainedTokenizerBase, arch: str
) -> None:
    model = make_tiny_model(arch)
    letter_ids = choice_letter_ids(tiny_tokenizer)
    batched = choice_logprobs(model, tiny_tokenizer, QUESTIONS, batch_size=3)
    for question, scores in zip(QUESTIONS, batched, strict=True):
        logprobs, _ = naive_answer_logprobs(model, tiny_tokenizer, question.message, "A")
        assert scores == pytest.approx(logprobs[0, letter_ids].tolist(), abs=1e-5)


def test_multiple_choice_message_and_reference() -> None:
    question = QUESTIONS[2]
    assert "about elementary mathematics" in question.message
    assert "\nA. 4\nB. 6\nC. 7\nD. 9\n" in question.message
    assert question.reference == "C"


# --- teacher-forced NLL and KL ----------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_gold_nll_per_token_matches_a_hand_computed_reference(
    make_tiny_model: ModelFactory, tiny_tokenizer: PreTrainedTokenizerBase, arch: str
) -> None:
    tiny_model = make_tiny_model(arch)
    result = gold_nll_per_token(target(tiny_model), tiny_tokenizer, PROMPTS, ANSWERS, batch_size=2,
                                chunk_size=3)
    totals, counts = [], []
    for prompt, answer in zip(PROMPTS, ANSWERS, strict=True):
        logprobs, answer_ids = naive_answer_logprobs(tiny_model, tiny_tokenizer, prompt, answer)
        totals.append(-logprobs.gather(-1, answer_ids[:, None]).sum().item())
        counts.append(len(answer_ids))
    assert counts[2] == 0 and math.isnan(result.per_item[2])
    expected = [total / count for total, count in zip(totals, counts, strict=True) if count]
    assert [value for value in result.per_item if not math.isnan(value)] == pytest.approx(expected, rel=1e-5)
    assert result.mean == pytest.approx(sum(totals) / sum(counts), rel=1e-5)
    assert result.num_tokens == sum(counts)


def test_gold_nll_rejects_mismatched_lengths(tiny_model: PreTrainedModel,
                                             tiny_tokenizer: PreTrainedTokenizerBase) -> None:
    with pytest.raises(SafesteerError, match="2 prompts but 1 answers"):
        gold_nll_per_token(target(tiny_model), tiny_tokenizer, PROMPTS[:2], ANSWERS[:1], batch_size=2)


def test_full_vocabulary_kl_matches_the_formula_and_is_chunk_invariant() -> None:
    generator = torch.Generator().manual_seed(0)
    logits_p = torch.randn(2, 5, 11, generator=generator).bfloat16()
    logits_q = torch.randn(2, 5, 11, generator=generator).bfloat16()
    p = logits_p.double().softmax(-1)
    expected = (p * (p.log() - logits_q.double().log_softmax(-1))).sum(-1)
    for chunk_size in (None, 2, 5):
        kl = divergence(logits_p, logits_q, mode="full", chunk_size=chunk_size)
        assert kl.double() == pytest.approx(expected, abs=1e-5)


def test_kl_to_base_is_zero_for_identical_models(
    tiny_model: PreTrainedModel, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    result, _ = kl_to_base_and_nll(target(tiny_model), target(tiny_model), tiny_tokenizer, PROMPTS,
                                   ANSWERS, batch_size=3)
    assert result.mean == pytest.approx(0.0, abs=1e-6)
    assert result.num_tokens > 0


def _naive_mean_kl(evaluated: nn.Module, base: nn.Module, tokenizer: PreTrainedTokenizerBase,
                   base_context: Callable[[], object] = nullcontext) -> tuple[float, list[float]]:
    totals, counts = [], []
    for prompt, answer in zip(PROMPTS, ANSWERS, strict=True):
        log_p, _ = naive_answer_logprobs(evaluated, tokenizer, prompt, answer)
        with base_context():
            log_q, _ = naive_answer_logprobs(base, tokenizer, prompt, answer)
        totals.append((log_p.exp() * (log_p - log_q)).sum().item())
        counts.append(log_p.shape[0])
    per_item = [total / count if count else math.nan for total, count in zip(totals, counts, strict=True)]
    return sum(totals) / sum(counts), per_item


def test_kl_to_base_matches_a_naive_reference_and_its_nll_the_gold_nll_pass(
    make_tiny_model: ModelFactory, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    base = make_tiny_model("llama")
    evaluated = copy.deepcopy(base)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in evaluated.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    result, nll = kl_to_base_and_nll(target(evaluated), target(base), tiny_tokenizer, PROMPTS, ANSWERS,
                                     batch_size=2, chunk_size=4)
    mean, per_item = _naive_mean_kl(evaluated, base, tiny_tokenizer)
    assert result.mean > 1e-4
    assert result.mean == pytest.approx(mean, rel=1e-4)
    assert result.per_item == pytest.approx(per_item, rel=1e-4, nan_ok=True)
    # benign-nll from kl-benign's pass: exactly the NLL of a pass of its own
    alone = gold_nll_per_token(target(evaluated), tiny_tokenizer, PROMPTS, ANSWERS, batch_size=2,
                               chunk_size=4)
    assert nll.mean == alone.mean and nll.num_tokens == alone.num_tokens == result.num_tokens
    assert nll.per_item == pytest.approx(alone.per_item, rel=0, abs=0, nan_ok=True)


def test_scoring_works_through_a_lora_student_sharing_the_base_weights(
    tiny_model: PreTrainedModel, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    """The base target is the PEFT model with its adapter disabled, as in the trainer."""
    plain = gold_nll_per_token(target(tiny_model), tiny_tokenizer, PROMPTS, ANSWERS, batch_size=2)
    student = get_peft_model(tiny_model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                    init_lora_weights=False))

    @contextmanager
    def base() -> Iterator[nn.Module]:
        with student.disable_adapter():
            yield student

    assert gold_nll_per_token(base, tiny_tokenizer, PROMPTS, ANSWERS,
                              batch_size=2).mean == pytest.approx(plain.mean, rel=1e-6)
    result, _ = kl_to_base_and_nll(target(student), base, tiny_tokenizer, PROMPTS, ANSWERS, batch_size=2)
    mean, _ = _naive_mean_kl(student, student, tiny_tokenizer, student.disable_adapter)
    assert result.mean > 1e-6
    assert result.mean == pytest.approx(mean, rel=1e-4)


def _last_block_input(model: nn.Module, layer: int, ids: list[int]) -> torch.Tensor:
    """Block ``layer``'s input at the last position of one unpadded row, [d]."""
    row = torch.tensor([ids])
    return block_input_at_last_position(model, layer, row, torch.ones_like(row))[0]


def test_conditional_teacher_gates_teacher_forced_answers_on_the_prompt(
    tiny_model: PreTrainedModel, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    """The gate must read each prompt's last token, not the end of the answer that follows it in a
    teacher-forced pass. The threshold is chosen so that the gate flags some prompts and not others,
    and so that on the last answer token it would decide at least one row the other way."""
    generator = torch.Generator().manual_seed(5)
    direction = Direction(torch.randn(32, generator=generator) * 3, layer=1, coefficient=1.0,
                          metadata={"num_layers": 2})
    probe = torch.randn(32, generator=generator)  # read at block 1: block 0's input is the last token's
    # embedding, the same for every prompt (they end in the same template tokens)
    scored = [index for index, answer in enumerate(ANSWERS) if answer]
    prompt_ids = [tiny_tokenizer(render_prompts(tiny_tokenizer, [PROMPTS[index]])[0],
                                 add_special_tokens=False)["input_ids"] for index in scored]
    answer_ids = [tiny_tokenizer(ANSWERS[index], add_special_tokens=False)["input_ids"] for index in scored]
    at_prompt = torch.stack([_last_block_input(tiny_model, 1, ids) for ids in prompt_ids]) @ probe
    at_answer = torch.stack([_last_block_input(tiny_model, 1, ids + answer)
                             for ids, answer in zip(prompt_ids, answer_ids, strict=True)]) @ probe
    midpoints = [(low + high) / 2 for low, high in pairwise(sorted([*at_prompt.tolist(),
                                                                     *at_answer.tolist()]))]
    threshold = next(value for value in midpoints
                     if 0 < int((at_prompt > value).sum()) < len(scored)
                     and not torch.equal(at_prompt > value, at_answer > value))
    flagged = (at_prompt > threshold).tolist()
    direction.gate = Gate(probe, layer=1, threshold=threshold)
    teacher = ConditionalTeacher(target(tiny_model), direction)

    result = gold_nll_per_token(teacher, tiny_tokenizer, PROMPTS, ANSWERS, batch_size=4)
    expected = []
    for index, steered in zip(scored, flagged, strict=True):
        with direction.steer(tiny_model) if steered else nullcontext():
            logprobs, ids = naive_answer_logprobs(tiny_model, tiny_tokenizer, PROMPTS[index], ANSWERS[index])
        expected.append(-logprobs.gather(-1, ids[:, None]).mean().item())
    assert [result.per_item[index] for index in scored] == pytest.approx(expected, rel=1e-4)
    kl, _ = kl_to_base_and_nll(teacher, target(tiny_model), tiny_tokenizer, PROMPTS, ANSWERS, batch_size=4)
    assert [kl.per_item[index] > 1e-6 for index in scored] == flagged


# --- answer extraction ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "gold", "expected"),
    [
        ("3 + 4 = 7 and 7 * 6 = 42\n#### 42", "42", True),
        ("She pays 1,000 + 234 = 1,234 dollars.\nThe answer is 1,234.", "1234", True),
        ("The answer is 18 apples, since 3 * 6 = 18 and 2 + 2 = 4.", "18", True),
        ("So the total is 7.", "7", True),
        ("It costs $5.00 in the end", "5", True),
        ("She has -3 left", "-3", True),
        ("Final answer: 0.5", "0.5", True),
        ("Therefore \\boxed{12}.", "12", True),
        ("The answer is 41.", "42", False),
        ("I do not know.", "7", False),
        ("The answer is 2280", "2,280", True),
    ],
)
def test_gsm8k_exact_match(text: str, gold: str, expected: bool) -> None:
    assert gsm8k_exact_match(text, gold) is expected


def test_extract_final_number() -> None:
    assert extract_final_number("#### 2,280") == "2280"
    assert extract_final_number("The answer is unclear, maybe 3 or 4") == "3"
    assert extract_final_number("no digits") is None


def test_gsm8k_reference_drops_calculator_notes_and_restates_the_answer() -> None:
    solution = gold._clean_solution("He buys 2*3=<<2*3=6>>6 eggs.\n#### 6")
    assert solution == "He buys 2*3=6 eggs.\nThe answer is 6."
    assert gsm8k_exact_match(GSM8KProblem("q", "6", solution).reference, "6")


def test_extract_code() -> None:
    assert extract_code("Sure:\n```python\ndef f():\n    return 1\n```\nDone.") == "def f():\n    return 1\n"
    assert extract_code("    return 1\n") == "    return 1\n"


# --- loaders (synthetic records) ------------------------------------------------------------------


def test_load_mmlu_filters_stem_and_samples_uniformly_in_file_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    questions = tuple(MultipleChoiceQuestion(f"q{index}", ("a", "b", "c", "d"), index % 4,
                                             "anatomy" if index % 3 else "philosophy")
                      for index in range(60))
    monkeypatch.setattr(gold, "_mmlu_questions", lambda: questions)
    stem = load_mmlu("stem")
    assert len(stem) == 40 and all(question.subject in MMLU_STEM_SUBJECTS for question in stem)
    assert len(load_mmlu("all")) == 60
    sample = load_mmlu("stem", limit=10, seed=3)
    assert sample == load_mmlu("stem", limit=10, seed=3)
    assert sample != load_mmlu("stem", limit=10, seed=4)
    assert len(sample) == 10 and set(sample) <= set(stem)
    assert [stem.index(question) for question in sample] == sorted(stem.index(q) for q in sample)
    assert load_mmlu("stem", limit=100) == stem
    with pytest.raises(SafesteerError, match="unknown MMLU subset"):
        load_mmlu("humanities")  # type: ignore[arg-type]


# --- confidence intervals -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("successes", "n", "low", "high"),
    [(0, 10, 0.0, 0.2775), (5, 10, 0.2366, 0.7634), (10, 10, 0.7225, 1.0), (1, 4, 0.0456, 0.6994)],
)
def test_wilson_interval_matches_hand_computed_values(successes: int, n: int, low: float,
                                                      high: float) -> None:
    assert wilson_interval(successes, n) == pytest.approx((low, high), abs=5e-5)


def test_wilson_interval_edge_cases() -> None:
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(SafesteerError):
        wilson_interval(11, 10)


def test_mean_confidence_interval() -> None:
    # mean 2.5, s = sqrt(5/3), half width 1.96 * s / 2 = 1.26517
    assert mean_confidence_interval([1.0, 2.0, math.nan, 3.0, 4.0]) == pytest.approx(
        (2.5, 1.23483, 3.76517), abs=1e-5)
    mean, low, high = mean_confidence_interval([3.0])
    assert mean == 3.0 and math.isnan(low) and math.isnan(high)
    with pytest.raises(SafesteerError):
        mean_confidence_interval([math.nan])


# --- the real benchmarks ----------------------------------------------------------------------------


@pytest.mark.integration
def test_mmlu_counts_and_stem_subjects() -> None:
    everything = load_mmlu("all")
    stem = load_mmlu("stem")
    assert len(everything) == 14_042
    assert len({question.subject for question in everything}) == 57
    assert len(stem) == 3_153
    assert {question.subject for question in stem} == MMLU_STEM_SUBJECTS
    assert all(len(question.choices) == 4 and 0 <= question.answer < 4 for question in everything)
    assert len(load_mmlu("stem", limit=500, seed=42)) == 500


@pytest.mark.integration
def test_gsm8k_has_100_problems_whose_references_reach_the_gold_answer() -> None:
    problems = load_gsm8k()
    assert len(problems) == 100
    assert all("<<" not in problem.solution for problem in problems)
    assert all(gsm8k_exact_match(problem.solution, problem.answer) for problem in problems)
    assert not any(problem.question.startswith("You're") for problem in problems)


@pytest.mark.integration
def test_humaneval_has_164_problems_and_canonical_solutions_pass() -> None:
    problems = load_humaneval()
    assert len(problems) == 164
    for problem in problems[:10]:
        result = humaneval_pass(problem, problem.canonical_solution)
        assert result.passed, (problem.task_id, result)
    assert not humaneval_pass(problems[0], "    return None\n").passed
