"""Stage 1 numerics against naive references, selection on synthetic scores, artifacts."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from safesteer.config import DataArguments
from safesteer.direction.artifact import Direction
from safesteer.direction.find import find_direction
from safesteer.direction.gate import calibrate_threshold, separation
from safesteer.direction.numerics import (
    difference_of_means,
    kl_divergence,
    refusal_score,
    refusal_token_ids,
)
from safesteer.direction.passes import (
    mean_response_activations,
    post_instruction_length,
    post_instruction_pass,
)
from safesteer.direction.prompt_method import (
    PromptCandidate,
    filter_by_refusal,
    prompt_candidate_status,
    select_prompt_candidate,
)
from safesteer.direction.prompt_sets import DirectionData
from safesteer.direction.response_method import (
    ResponseCandidate,
    default_response_layers,
    select_response_candidate,
)
from safesteer.direction_config import DirectionConfig
from safesteer.errors import SafesteerError
from safesteer.models.rendering import encode_rendered, render_prompts
from safesteer.steering import record_block_inputs

HARMFUL = [f"Explain how to break rule number {i} of the club." for i in range(6)]
HARMLESS = [f"Write a short poem about the number {i}." for i in range(6)]


def test_difference_of_means_matches_a_loop():
    first, second = torch.randn(7, 3, 4), torch.randn(5, 3, 4)
    naive = (sum(first[i].double() for i in range(7)) / 7
             - sum(second[i].double() for i in range(5)) / 5)
    torch.testing.assert_close(difference_of_means(first, second), naive)


def test_refusal_score_formula():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0], [3.0, 0.0, 0.0, 0.0]])
    probs = torch.softmax(logits.double(), -1)
    for row in range(2):
        p_ref = probs[row, 1] + probs[row, 3]
        expected = math.log(p_ref + 1e-8) - math.log(1 - p_ref + 1e-8)
        assert refusal_score(logits, [1, 3])[row].item() == pytest.approx(expected, abs=1e-12)


def test_kl_divergence_formula():
    base, other = torch.randn(3, 6), torch.randn(3, 6)
    p, q = torch.softmax(base.double(), -1), torch.softmax(other.double(), -1)
    expected = [sum(p[r, v] * (math.log(p[r, v] + 1e-6) - math.log(q[r, v] + 1e-6))
                    for v in range(6)) for r in range(3)]
    torch.testing.assert_close(kl_divergence(base, other), torch.tensor(expected, dtype=torch.float64))
    assert kl_divergence(base, base).abs().max() < 1e-12


def test_candidate_filters_on_synthetic_scores():
    def status(layer, induce=None, kl=None, bypass=None):
        return prompt_candidate_status(PromptCandidate(-1, layer, induce, kl, bypass), 10, 0.1, 0.2)

    assert status(8, 1.0, 0.0, -1.0) == "pruned-layer"  # floor(0.8 * 10) = 8
    assert status(7, 1.0, 0.0, -1.0) == "ok"
    assert status(3, -0.1) == "induce<0"
    assert status(3, 0.0, 0.2, 0.0) == "kl>threshold"
    assert status(3, 0.0, 0.1, 0.0) == "ok"
    assert status(3, float("nan"), 0.0, 0.0) == "nan"
    assert status(3, 0.5) == "pending"


def test_selection_takes_lowest_bypass_with_deterministic_ties():
    candidates = [PromptCandidate(-1, 5, 1.0, 0.0, -2.0, "ok"),
                  PromptCandidate(-2, 3, 1.0, 0.0, -2.0, "ok"),
                  PromptCandidate(-1, 4, 1.0, 0.0, -1.0, "ok"),
                  PromptCandidate(-1, 1, 1.0, 0.0, -9.0, "induce<0")]
    chosen = select_prompt_candidate(candidates)
    assert (chosen.layer, chosen.position) == (3, -2)
    assert select_prompt_candidate([PromptCandidate(-1, 1, status="induce<0")]) is None


def test_response_selection_prefers_fewest_benign_refusals_above_target():
    candidates = [ResponseCandidate(10, 0.2, 1.0, 1.00, 0.50),
                  ResponseCandidate(12, 0.3, 1.0, 0.95, 0.40),
                  ResponseCandidate(14, 0.1, 1.0, 0.50, 0.00)]
    assert select_response_candidate(candidates, 0.9).layer == 12
    assert select_response_candidate(candidates, 1.0).layer == 10
    # Nobody reaches the target: widest margin wins (0.95 - 0.40 = 0.55 > 0.50 = 1.00 - 0.50).
    below = [ResponseCandidate(10, 0.2, 1.0, 0.6, 0.3), ResponseCandidate(12, 0.2, 1.0, 0.5, 0.0)]
    assert select_response_candidate(below, 0.9).layer == 12
    with pytest.raises(SafesteerError):
        select_response_candidate([], 0.9)


def test_filter_by_refusal_keeps_matching_prompts_or_all_when_too_few():
    prompts = ["a", "b", "c", "d"]
    scores = torch.tensor([1.0, -1.0, 2.0, -3.0])
    assert filter_by_refusal(prompts, scores, True, minimum=2) == (["a", "c"], True)
    assert filter_by_refusal(prompts, scores, False, minimum=2) == (["b", "d"], True)
    assert filter_by_refusal(prompts, scores, True, minimum=3) == (prompts, False)


def test_default_response_layers_cover_the_middle():
    assert default_response_layers(30, 2) == [6, 8, 10, 12, 14, 16, 18, 20, 22]
    assert default_response_layers(2, 2) == [0]


def test_refusal_tokens_and_positions_come_from_the_tokenizer(tiny_tokenizer):
    ids = refusal_token_ids(tiny_tokenizer)
    assert ids == sorted(set(ids))
    assert tiny_tokenizer.encode("I", add_special_tokens=False)[0] in ids
    suffix = "<|im_end|>\n<|im_start|>assistant\n"
    expected = len(tiny_tokenizer.encode(suffix, add_special_tokens=False))
    assert post_instruction_length(tiny_tokenizer) == expected


def _naive_block_inputs(model, tokenizer, text):
    encoded = encode_rendered(tokenizer, [text], torch.device("cpu"))
    with torch.no_grad(), record_block_inputs(model) as captured:
        model(**encoded)
    return torch.stack([captured[layer][0] for layer in sorted(captured)]).double()  # [L, seq, d]


def test_post_instruction_pass_matches_unbatched_loop(tiny_model, tiny_tokenizer):
    prompts = [*HARMFUL[:3], "Short?"]
    activations, scores = post_instruction_pass(tiny_model, tiny_tokenizer, prompts, 3, [5, 7], batch_size=4)
    rendered = render_prompts(tiny_tokenizer, prompts)
    for row, text in enumerate(rendered):
        naive = _naive_block_inputs(tiny_model, tiny_tokenizer, text)[:, -3:].transpose(0, 1)
        torch.testing.assert_close(activations[row].double(), naive, atol=1e-4, rtol=1e-4)
        encoded = encode_rendered(tiny_tokenizer, [text], torch.device("cpu"))
        with torch.no_grad():
            logits = tiny_model(**encoded).logits[:, -1]
        torch.testing.assert_close(scores[row], refusal_score(logits, [5, 7])[0], atol=1e-4, rtol=1e-4)


def test_response_means_match_unbatched_loop(tiny_model, tiny_tokenizer):
    prompts, responses = HARMFUL[:3], ["No thanks.", "I will not do that at all, sorry.", "Fine."]
    means, norms = mean_response_activations(tiny_model, tiny_tokenizer, prompts, responses, batch_size=3)
    rendered = render_prompts(tiny_tokenizer, prompts)
    naive_means, naive_norms = 0, 0
    for text, response in zip(rendered, responses, strict=True):
        count = len(tiny_tokenizer.encode(response, add_special_tokens=False))
        acts = _naive_block_inputs(tiny_model, tiny_tokenizer, text + response)[:, -count:]
        naive_means = naive_means + acts.mean(1) / 3
        naive_norms = naive_norms + acts.norm(dim=-1).mean(1) / 3
    torch.testing.assert_close(means, naive_means, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(norms, naive_norms, atol=1e-4, rtol=1e-4)


@pytest.fixture
def prompt_files(tmp_path):
    paths = {}
    for name, prompts in {"harmful": HARMFUL, "harmless": HARMLESS}.items():
        paths[name] = tmp_path / f"{name}.txt"
        paths[name].write_text("\n".join(prompts) + "\n", encoding="utf-8")
    return paths


def _config(prompt_files, **overrides):
    files = {"harmful_train": str(prompt_files["harmful"]), "harmless_train": str(prompt_files["harmless"]),
             "harmful_val": str(prompt_files["harmful"]), "harmless_val": str(prompt_files["harmless"])}
    sizes = {"n_train": 6, "n_val": 4, "batch_size": 4, "response_n_train": 4, "response_n_val": 2,
             "val_max_new_tokens": 3, "response_betas": [0.5]}
    return DirectionConfig(**{**files, **sizes, **overrides})


@pytest.mark.parametrize("method", ["auto", "response"])
def test_find_direction_end_to_end_and_reproducible(tiny_model, tiny_tokenizer, prompt_files, tmp_path,
                                                    method):
    config = _config(prompt_files, method=method)
    first = find_direction(tiny_model, tiny_tokenizer, config, DataArguments(), "tiny")
    second = find_direction(tiny_model, tiny_tokenizer, config, DataArguments(), "tiny")
    first.save(tmp_path / "a")
    second.save(tmp_path / "b")
    for name in ("direction.safetensors", "direction.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    loaded = Direction.load(tmp_path / "a")
    torch.testing.assert_close(loaded.vector, first.vector)
    assert loaded.layer == first.layer and loaded.coefficient == pytest.approx(first.coefficient)
    meta = loaded.metadata
    assert meta["method"] in ("prompt", "response") and meta["selection_reason"]
    assert meta["hidden_size"] == tiny_model.config.hidden_size
    assert set(meta["data"]) == {"harmful_train", "harmless_train", "harmful_val", "harmless_val"}
    if method == "auto":
        assert len(meta["reports"]["prompt"]["candidates"]) == (
            meta["reports"]["prompt"]["post_instruction_positions"] * tiny_model.config.num_hidden_layers)


def test_induce_screen_only_skips_work(tiny_model, tiny_tokenizer, prompt_files):
    exact = _config(prompt_files, method="auto", induce_screen_prompts=0)
    screened = _config(prompt_files, method="auto", induce_screen_prompts=2, induce_screen_margin=0.0)
    first = find_direction(tiny_model, tiny_tokenizer, exact, DataArguments(), "tiny")
    second = find_direction(tiny_model, tiny_tokenizer, screened, DataArguments(), "tiny")
    assert first.layer == second.layer and torch.equal(first.vector, second.vector)
    report = second.metadata["reports"]["prompt"]
    assert report["screened_candidates"] > 0
    assert first.metadata["reports"]["prompt"]["screened_candidates"] == 0


def test_prompt_method_fails_clearly_when_nothing_survives(tiny_model, tiny_tokenizer, prompt_files):
    config = _config(prompt_files, method="prompt", prune_layer_fraction=0.99)
    with pytest.raises(SafesteerError, match="--method response"):
        find_direction(tiny_model, tiny_tokenizer, config, DataArguments(), "tiny")


def test_direction_for_another_model_is_rejected(tiny_model, make_tiny_model, tmp_path):
    width = tiny_model.config.hidden_size
    Direction(torch.ones(width + 8), 0, 1.0, {"num_layers": 2, "model": "other"}).save(tmp_path)
    with pytest.raises(SafesteerError, match="hidden size"):
        Direction.load(tmp_path).check_compatible(tiny_model)
    with pytest.raises(SafesteerError, match="does not exist"):
        Direction.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SafesteerError, match="no direction"):
        Direction.load(tmp_path / "empty")


def test_config_validation():
    with pytest.raises(SafesteerError, match="--method"):
        DirectionConfig(method="magic")
    with pytest.raises(SafesteerError, match="--n-train"):
        DirectionConfig(n_train=0)
    with pytest.raises(SafesteerError, match="--response-betas"):
        DirectionConfig(response_betas=[0.0])


def test_damaged_direction_files_give_clear_errors(tmp_path):
    Direction(torch.ones(4), 0, 1.0, {}).save(tmp_path)
    (tmp_path / "direction.json").write_text('{"coefficient": 1.0}')
    with pytest.raises(SafesteerError, match="'layer'"):
        Direction.load(tmp_path)
    (tmp_path / "direction.json").write_text('{"layer": 0, "coefficient": 1.0}')
    (tmp_path / "direction.safetensors").write_bytes(b"garbage")
    with pytest.raises(SafesteerError, match="safetensors"):
        Direction.load(tmp_path)


def _brute_force_threshold(harmful, harmless):
    """Every midpoint, scored by balanced accuracy; ties to the widest gap between neighbours."""
    values = sorted(set(harmful + harmless))
    best = None
    for low, high in itertools.pairwise(values):
        threshold = (low + high) / 2
        accuracy = (sum(h > threshold for h in harmful) / len(harmful)
                    + sum(b <= threshold for b in harmless) / len(harmless)) / 2
        key = (accuracy, high - low)
        if best is None or key > best[0]:
            best = (key, threshold)
    return best[1], best[0][0]


@pytest.mark.parametrize("seed", range(5))
def test_calibrate_threshold_matches_brute_force(seed):
    generator = torch.Generator().manual_seed(seed)
    harmful = (torch.randn(9, generator=generator) + 1.0).tolist()
    harmless = torch.randn(7, generator=generator).tolist()
    threshold, accuracy = calibrate_threshold(torch.tensor(harmful), torch.tensor(harmless))
    expected_threshold, expected_accuracy = _brute_force_threshold(harmful, harmless)
    assert threshold == pytest.approx(expected_threshold) and accuracy == pytest.approx(expected_accuracy)


def test_calibrate_threshold_takes_the_middle_of_a_clean_gap():
    threshold, accuracy = calibrate_threshold(torch.tensor([5.0, 6.0, 9.0]), torch.tensor([-1.0, 1.0]))
    assert accuracy == 1.0 and threshold == pytest.approx(3.0)
    assert separation(torch.tensor([1.0, 3.0]), torch.tensor([-1.0, 1.0])) == pytest.approx(2 / math.sqrt(2))


def test_direction_has_a_gate_that_survives_save_and_load(tiny_model, tiny_tokenizer, prompt_files,
                                                          tmp_path):
    config = _config(prompt_files, method="response", response_layers=[1])
    direction = find_direction(tiny_model, tiny_tokenizer, config, DataArguments(), "tiny")
    gate = direction.gate
    assert gate is not None and 0 <= gate.layer <= direction.layer
    assert gate.vector.norm().item() == pytest.approx(1.0, abs=1e-5)
    assert gate.metadata["val_counts"] == {"harmful": 6, "harmless": 6}
    direction.save(tmp_path)
    loaded = Direction.load(tmp_path)
    assert loaded.gate is not None and loaded.gate.layer == gate.layer
    assert loaded.gate.threshold == pytest.approx(gate.threshold)
    torch.testing.assert_close(loaded.gate.vector, gate.vector)
    # the gate flags prompts exactly as the probe on the recorded block input says
    encoded = encode_rendered(tiny_tokenizer, render_prompts(tiny_tokenizer, HARMFUL + HARMLESS), "cpu")
    with torch.no_grad(), record_block_inputs(tiny_model) as captured:
        tiny_model(**encoded)
    expected = captured[gate.layer][:, -1] @ gate.vector > gate.threshold
    assert torch.equal(loaded.gate_rows(tiny_model, encoded["input_ids"], encoded["attention_mask"]),
                       expected)


def test_gate_sets_default_to_the_direction_sets_and_can_be_given_apart(prompt_files, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text("Describe a quiet lake.\nName two planets.\n", encoding="utf-8")
    config = _config(prompt_files, gate_harmless_train=str(other))
    sets = DirectionData.load(config, DataArguments())
    gate_sets = sets.for_gate(config, DataArguments())
    assert gate_sets.harmless_train == ["Describe a quiet lake.", "Name two planets."]
    assert (gate_sets.harmful_train, gate_sets.harmful_val, gate_sets.harmless_val) == (
        sets.harmful_train, sets.harmful_val, sets.harmless_val)
    assert gate_sets.sources["harmless_train"] == str(other)
    assert sets.for_gate(_config(prompt_files), DataArguments()) == sets


def test_steer_rows_adds_the_vector_to_the_chosen_rows_only(tiny_model, tiny_tokenizer):
    width = tiny_model.config.hidden_size
    direction = Direction(torch.randn(width, generator=torch.Generator().manual_seed(0)), 1, 0.7, {})
    encoded = encode_rendered(tiny_tokenizer, render_prompts(tiny_tokenizer, HARMFUL[:3]), "cpu")
    with torch.no_grad(), record_block_inputs(tiny_model) as captured:
        tiny_model(**encoded)
    before = captured[1]
    rows = torch.tensor([True, False, True])
    with torch.no_grad(), direction.steer(tiny_model, rows=rows), record_block_inputs(tiny_model) as captured:
        tiny_model(**encoded)  # recorded after the steering hook, which was registered first
    shift = captured[1] - before
    torch.testing.assert_close(shift[1], torch.zeros_like(shift[1]))
    for row in (0, 2):
        torch.testing.assert_close(shift[row], (0.7 * direction.vector).expand_as(shift[row]),
                                   atol=1e-5, rtol=0)


def test_conditional_teacher_needs_a_gate(tiny_model):
    direction = Direction(torch.ones(tiny_model.config.hidden_size), 0, 1.0, {})
    with pytest.raises(SafesteerError, match="no harmfulness gate"), direction.steer(tiny_model, gated=True):
        pass
