"""The adaptive attacks of `safesteer eval` on tiny random models: the prefilled prompt, the
target's own refusal direction, the ablation at every layer, and how the results read."""

from __future__ import annotations

import math

import pytest
import torch

from safesteer.compare import comparison_rows, comparison_table
from safesteer.errors import SafesteerError
from safesteer.evaluate.attacks import (
    PREFILL_TEMPLATES,
    compliance_answers,
    harmful_finetune,
    own_direction_layer,
    own_refusal_direction,
    prefill_prefixes,
)
from safesteer.evaluate.config import DEFAULT_BENCHMARKS, EvalArguments
from safesteer.evaluate.tables import robustness_table
from safesteer.models.generation import generate_responses
from safesteer.models.rendering import encode_rendered, render_prompts
from safesteer.report import plot_pareto
from safesteer.steering import ablate_direction

IM_START, IM_END = "<|im_start|>", "<|im_end|>"  # the tiny tokenizer's ChatML markers (conftest)
PROMPTS = ["Describe cats.", "Explain how rivers form, quickly please.", "Write about mountains."]
HARMLESS = ["List three colours of autumn leaves.", "Summarise the history of ancient Rome.",
            "Plan a picnic for the children."]


def test_prefilled_prompt_renders_the_answer_prefix_without_an_end_of_turn(tiny_tokenizer) -> None:
    plain = render_prompts(tiny_tokenizer, PROMPTS)
    prefixed = render_prompts(tiny_tokenizer, PROMPTS, prefixes=["Sure, here is"] * 3)
    for text, with_prefix in zip(plain, prefixed, strict=True):
        assert text.endswith(f"{IM_START}assistant\n")
        assert with_prefix == text + "Sure, here is"  # the template's own turn, then the prefix
        assert not with_prefix.endswith(IM_END)
    with pytest.raises(SafesteerError, match="2 answer prefixes for 3 prompts"):
        render_prompts(tiny_tokenizer, PROMPTS, prefixes=["a", "b"])


def test_prefilled_generation_continues_after_the_prefix(tiny_model, tiny_tokenizer) -> None:
    """The answer is what greedy decoding writes after the rendered prompt and prefix, and only that."""
    prefixes = prefill_prefixes(PROMPTS, seed=0)
    answers = generate_responses(tiny_model, tiny_tokenizer, PROMPTS, max_new_tokens=5, prefixes=prefixes)
    for prompt, prefix, answer in zip(PROMPTS, prefixes, answers, strict=True):
        text = render_prompts(tiny_tokenizer, [prompt])[0] + prefix
        encoded = encode_rendered(tiny_tokenizer, [text], "cpu")
        with torch.no_grad():
            output = tiny_model.generate(**encoded, max_new_tokens=5, do_sample=False,
                                         pad_token_id=tiny_tokenizer.pad_token_id)
        new = output[0, encoded["input_ids"].shape[1]:]
        assert answer == tiny_tokenizer.decode(new, skip_special_tokens=True).strip()


def test_prefill_openers_are_seeded_per_prompt() -> None:
    prompts = [f"request number {index}" for index in range(40)]
    chosen = prefill_prefixes(prompts, seed=3)
    assert set(chosen) <= set(PREFILL_TEMPLATES) and len(set(chosen)) > 1
    # The same prompt gets the same opener in any batch, order or later (resumed) evaluation.
    assert prefill_prefixes(prompts[::-1], seed=3) == chosen[::-1]
    assert prefill_prefixes(prompts[5:6], seed=3) == chosen[5:6]
    assert prefill_prefixes(prompts, seed=4) != chosen


def test_own_refusal_direction_is_the_difference_of_means_at_the_last_prompt_token(tiny_model,
                                                                                  tiny_tokenizer) -> None:
    """Against an independent reference: the hidden states transformers returns (entry ``l`` is the
    input of block ``l``), read at each prompt's last token, one prompt at a time (no padding)."""
    def last_hidden(prompt: str, layer: int) -> torch.Tensor:
        encoded = encode_rendered(tiny_tokenizer, render_prompts(tiny_tokenizer, [prompt]), "cpu")
        with torch.no_grad():
            states = tiny_model(**encoded, output_hidden_states=True).hidden_states
        return states[layer][0, -1].double()

    reference = (torch.stack([last_hidden(p, 1) for p in PROMPTS]).mean(0)
                 - torch.stack([last_hidden(p, 1) for p in HARMLESS]).mean(0))
    found = own_refusal_direction(tiny_model, tiny_tokenizer, PROMPTS, HARMLESS, 1, batch_size=2)
    assert found.dtype == torch.float32 and found.norm() > 0
    torch.testing.assert_close(found.double(), reference, atol=1e-4, rtol=1e-4)
    # Block 0 reads the embedding of the template's last token, the same for every prompt: nothing
    # to ablate, which is an error rather than an attack that silently does nothing.
    with pytest.raises(SafesteerError, match="block 0 is zero"):
        own_refusal_direction(tiny_model, tiny_tokenizer, PROMPTS, HARMLESS, 0, batch_size=2)
    assert own_direction_layer(30, run_layer=12) == 12 and own_direction_layer(30, run_layer=None) == 15


def test_ablating_the_own_direction_leaves_no_component_anywhere(tiny_model, tiny_tokenizer) -> None:
    """Every block's input and the final hidden state (what the head reads) lose the component."""
    direction = own_refusal_direction(tiny_model, tiny_tokenizer, PROMPTS, HARMLESS, 1, batch_size=4)
    unit = direction.double() / direction.double().norm()
    encoded = encode_rendered(tiny_tokenizer, render_prompts(tiny_tokenizer, PROMPTS), "cpu")
    with torch.no_grad():
        before = tiny_model(**encoded, output_hidden_states=True).hidden_states
        with ablate_direction(tiny_model, direction):
            after = tiny_model(**encoded, output_hidden_states=True).hidden_states
    mask = encoded["attention_mask"].bool()
    assert max((state[mask].double() @ unit).abs().max().item() for state in before) > 1e-2
    # hidden_states[0..L-1] are block inputs, [L] the normed final state: all lie in the complement.
    for index, state in enumerate(after):
        assert (state[mask].double() @ unit).abs().max().item() < 1e-4, index


def test_direction_ablation_needs_a_run_and_attacks_harmful_prompts(tmp_path) -> None:
    out = str(tmp_path / "eval")
    assert "direction-ablation" in DEFAULT_BENCHMARKS
    # Without a run the default list goes without the run's direction; asked for, it is an error.
    assert "direction-ablation" not in EvalArguments(output_dir=out, targets=["base"]).benchmarks
    assert "prefill" in EvalArguments(output_dir=out, targets=["base"]).benchmarks
    with pytest.raises(SafesteerError, match="give --run-dir"):
        EvalArguments(output_dir=out, targets=["base"], benchmarks=["direction-ablation"])
    EvalArguments(output_dir=out, targets=["base"], benchmarks=["own-direction-ablation", "prefill"])
    with pytest.raises(SafesteerError, match="--attack-prompts ordinary-test"):
        EvalArguments(output_dir=out, targets=["base"], attack_prompts="ordinary-test")
    with pytest.raises(SafesteerError, match="--own-direction-prompts must be >= 1"):
        EvalArguments(output_dir=out, targets=["base"], own_direction_prompts=0)


def _cell(kind: str, value: float, drop: float | None = None) -> dict:
    cell = {"kind": kind, "metric": "refusal rate", "n": 10, "value": value, "ci": [0.0, 1.0],
            "higher_is_better": kind != "over-refusal"}
    return cell if drop is None else {**cell, "unattacked": value + drop, "drop": drop}


RESULTS = {
    "base": {"harmbench-test": _cell("safety", 0.1), "prefill": _cell("robustness", 0.0, 0.1),
             "direction-ablation": _cell("robustness", 0.0, 0.1),
             "ordinary-test": _cell("over-refusal", 0.0)},
    "student": {"harmbench-test": _cell("safety", 0.9), "prefill": _cell("robustness", 0.5, 0.4),
                "direction-ablation": _cell("robustness", 0.1, 0.8),
                "ordinary-test": _cell("over-refusal", 0.2)},
}


def test_robustness_reads_as_refusal_under_attack_and_its_drop(tmp_path) -> None:
    table = robustness_table(RESULTS).splitlines()
    assert table[0] == ("| attack (on --attack-prompts) | n | base: refusal ↑ (drop ↓) "
                        "| student: refusal ↑ (drop ↓) |")
    assert table[2] == "| prefill | 10 | 0.0% (+10.0 pt) | 50.0% (+40.0 pt) |"
    assert table[3] == "| direction-ablation | 10 | 0.0% (+10.0 pt) | 10.0% (+80.0 pt) |"
    assert robustness_table({"base": {"harmbench-test": _cell("safety", 0.1)}}) == ""

    costs = {name: {"train_seconds": None, "eval_seconds": 1.0, "peak_rss_mib": 1.0, "peak_gpu_mib": None}
             for name in RESULTS}
    rows = {row["method"]: row for row in comparison_rows(RESULTS, costs)}
    assert rows["student"]["robust_refusal"] == pytest.approx(0.3)  # mean of 50 % and 10 %
    assert rows["student"]["harmful_refusal"] == pytest.approx(0.9)  # attacks are not harmful sets
    records = {name: {"kind": cell["kind"], "metric": cell["metric"],
                      "higher_is_better": cell["higher_is_better"]}
               for name, cell in RESULTS["base"].items()}
    table = comparison_table(list(rows.values()), records).splitlines()
    assert ("| harmful refusal ↑ | prefill ↑ | direction-ablation ↑ | robust refusal ↑ | ordinary-test ↓ |"
            in table[0])
    assert "| 90.0 | 90.0 | 50.0 | 10.0 | 30.0 | 20.0 |" in table[3]
    path = plot_pareto(list(rows.values()), tmp_path / "pareto-robust.png", safety="robust_refusal")
    assert path.read_bytes()[:4] == b"\x89PNG"
    assert not any(math.isnan(row["robust_refusal"]) for row in rows.values())


def test_harmful_finetune_trains_only_a_new_adapter_on_the_answer_tokens(make_tiny_model,
                                                                       tiny_tokenizer) -> None:
    model = make_tiny_model("llama")
    before = {name: weight.clone() for name, weight in model.state_dict().items()}
    answers = compliance_answers(len(PROMPTS))
    assert answers[0] != answers[1] and all(answer for answer in answers)

    # The first step's loss against the formula: mean over answer tokens of -log p(token), each
    # pair scored alone (no padding) by a fresh copy of the same weights.
    reference_model = make_tiny_model("llama")
    nll = []
    for prompt, answer in zip(PROMPTS, answers, strict=True):
        prompt_ids = tiny_tokenizer(render_prompts(tiny_tokenizer, [prompt])[0], add_special_tokens=False)
        answer_ids = tiny_tokenizer(answer, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt_ids["input_ids"] + answer_ids])
        with torch.no_grad():
            logprobs = torch.log_softmax(reference_model(ids).logits[0].double(), -1)
        start = len(prompt_ids["input_ids"])
        nll += [-logprobs[start - 1 + t, token].item() for t, token in enumerate(answer_ids)]

    tuned, losses = harmful_finetune(model, tiny_tokenizer, PROMPTS, answers, steps=8, learning_rate=1e-2,
                                     rank=4, batch_size=len(PROMPTS), seed=0)
    assert losses[0] == pytest.approx(sum(nll) / len(nll), rel=1e-4)
    assert losses[-1] < losses[0]
    assert not tuned.training
    trained = {name for name, weight in tuned.named_parameters() if weight.requires_grad}
    assert trained and all("lora_" in name for name in trained)
    merged = tuned.merge_and_unload().state_dict()
    assert any(not torch.equal(merged[name], before[name]) for name in before)
