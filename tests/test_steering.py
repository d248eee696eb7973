"""Hook arithmetic of the steering module, checked on tiny random models."""

from __future__ import annotations

import pytest
import torch

from safesteer.errors import SafesteerError
from safesteer.models.layout import decoder_layers
from safesteer.models.rendering import encode_rendered, render_prompts
from safesteer.steering import (
    _replace_hidden,
    _split_hidden,
    ablate_direction,
    add_to_block_input,
    block_input_at_last_position,
    block_inputs_at_last_position,
    gated_add_to_block_input,
    project_out,
    record_block_inputs,
)

PROMPTS = ["Tell me a story about a cat.", "What is two plus two?"]


def _encode(model, tokenizer, prompts=PROMPTS):
    return encode_rendered(tokenizer, render_prompts(tokenizer, prompts), next(model.parameters()).device)


def _inputs(model, encoded) -> dict[int, torch.Tensor]:
    with torch.no_grad(), record_block_inputs(model) as captured:
        model(**encoded)
    return {layer: value.clone() for layer, value in captured.items()}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])
def test_add_changes_block_input_by_exactly_c_r_everywhere(make_tiny_model, tiny_tokenizer, arch):
    model = make_tiny_model(arch)
    encoded = _encode(model, tiny_tokenizer)
    width = model.get_input_embeddings().weight.shape[-1]
    vector = torch.randn(width, generator=torch.Generator().manual_seed(0))
    before = _inputs(model, encoded)
    with add_to_block_input(model, 1, vector, coefficient=0.5):
        steered = _inputs(model, encoded)
    after = _inputs(model, encoded)
    torch.testing.assert_close(steered[0], before[0])
    torch.testing.assert_close(steered[1] - before[1], (0.5 * vector).expand_as(before[1]),
                               atol=1e-5, rtol=0)
    for layer in before:
        torch.testing.assert_close(after[layer], before[layer], atol=0, rtol=0)
    assert all(not block._forward_pre_hooks for block in decoder_layers(model))


def test_hooks_are_removed_when_the_body_raises(tiny_model):
    vector = torch.ones(tiny_model.get_input_embeddings().weight.shape[-1])
    with pytest.raises(RuntimeError), add_to_block_input(tiny_model, 0, vector):
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError), ablate_direction(tiny_model, vector):
        raise RuntimeError("boom")
    for block in decoder_layers(tiny_model):
        assert not block._forward_pre_hooks
        assert all(not module._forward_hooks for module in block.modules())


def test_per_row_vectors_steer_each_row_separately(tiny_model, tiny_tokenizer):
    encoded = _encode(tiny_model, tiny_tokenizer)
    width = tiny_model.get_input_embeddings().weight.shape[-1]
    rows = torch.stack([torch.zeros(width), torch.ones(width)])
    before = _inputs(tiny_model, encoded)
    with add_to_block_input(tiny_model, 1, rows):
        steered = _inputs(tiny_model, encoded)
    torch.testing.assert_close(steered[1][0], before[1][0])
    torch.testing.assert_close(steered[1][1] - before[1][1], torch.ones_like(before[1][1]),
                               atol=1e-5, rtol=0)


def test_keyword_hidden_states_are_steered():
    hidden = torch.zeros(1, 2, 3)
    args, kwargs = (), {"hidden_states": hidden, "attention_mask": None}
    found, positional = _split_hidden(args, kwargs)
    assert found is hidden and not positional
    new_args, new_kwargs = _replace_hidden(args, kwargs, hidden + 1, positional)
    assert new_args == () and torch.equal(new_kwargs["hidden_states"], hidden + 1)
    assert new_kwargs["attention_mask"] is None
    with pytest.raises(SafesteerError):
        _split_hidden((), {})


def test_steering_changes_logits(tiny_model, tiny_tokenizer):
    encoded = _encode(tiny_model, tiny_tokenizer)
    vector = torch.randn(tiny_model.get_input_embeddings().weight.shape[-1])
    with torch.no_grad():
        base = tiny_model(**encoded).logits
        with add_to_block_input(tiny_model, 0, vector, 4.0):
            steered = tiny_model(**encoded).logits
    assert not torch.allclose(base, steered)


def test_left_padding_does_not_change_steered_logits(tiny_model, tiny_tokenizer):
    short, long = "Hi.", "Please describe the weather in a long and careful way today."
    vector = torch.randn(tiny_model.get_input_embeddings().weight.shape[-1])
    with torch.no_grad(), add_to_block_input(tiny_model, 1, vector, 2.0):
        alone = tiny_model(**_encode(tiny_model, tiny_tokenizer, [short])).logits[0, -1]
        batched = tiny_model(**_encode(tiny_model, tiny_tokenizer, [long, short])).logits[1, -1]
    torch.testing.assert_close(alone, batched, atol=1e-4, rtol=1e-4)


def test_generate_with_kv_cache_matches_generate_without(tiny_model, tiny_tokenizer):
    encoded = _encode(tiny_model, tiny_tokenizer)
    vector = torch.randn(tiny_model.get_input_embeddings().weight.shape[-1])
    options = {"max_new_tokens": 6, "do_sample": False,
               "pad_token_id": tiny_tokenizer.pad_token_id}
    with torch.no_grad(), add_to_block_input(tiny_model, 1, vector, 3.0):
        cached = tiny_model.generate(**encoded, use_cache=True, **options)
        uncached = tiny_model.generate(**encoded, use_cache=False, **options)
        unsteered_check = tiny_model(**encoded).logits
    with torch.no_grad():
        base = tiny_model.generate(**encoded, use_cache=True, **options)
        base_logits = tiny_model(**encoded).logits
    assert torch.equal(cached, uncached)
    assert not torch.allclose(unsteered_check, base_logits)
    assert base.shape == cached.shape


def test_project_out_removes_the_component():
    hidden = torch.randn(2, 5, 8, dtype=torch.float64)
    unit = torch.randn(8, dtype=torch.float64)
    unit = unit / unit.norm()
    removed = project_out(hidden, unit)
    naive = hidden.clone()
    for b in range(2):
        for s in range(5):
            naive[b, s] -= torch.dot(hidden[b, s].float().double(), unit) * unit
    torch.testing.assert_close(removed, naive, atol=1e-6, rtol=1e-6)
    assert removed.matmul(unit).abs().max() < 1e-6


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_ablation_leaves_no_component_in_any_block_input(make_tiny_model, tiny_tokenizer, arch):
    model = make_tiny_model(arch)
    encoded = _encode(model, tiny_tokenizer)
    direction = torch.randn(model.get_input_embeddings().weight.shape[-1])
    unit = direction / direction.norm()
    before = _inputs(model, encoded)
    with ablate_direction(model, direction):
        ablated = _inputs(model, encoded)
    assert max((before[layer] @ unit).abs().max().item() for layer in before) > 1e-2
    for layer, value in ablated.items():
        assert (value @ unit).abs().max().item() < 1e-4, layer


def test_wrong_width_and_layer_are_rejected(tiny_model):
    width = tiny_model.get_input_embeddings().weight.shape[-1]
    with pytest.raises(SafesteerError, match="hidden size"), \
            add_to_block_input(tiny_model, 0, torch.ones(width + 1)):
        pass
    with pytest.raises(SafesteerError, match="outside"), \
            add_to_block_input(tiny_model, 99, torch.ones(width)):
        pass


def _prefill_inputs(model, encoded, context) -> dict[int, torch.Tensor]:
    with context:
        return _inputs(model, encoded)


def test_gated_add_steers_exactly_the_rows_the_probe_flags(make_tiny_model, tiny_tokenizer):
    model = make_tiny_model("llama")
    encoded = _encode(model, tiny_tokenizer)
    width = model.get_input_embeddings().weight.shape[-1]
    vector = torch.randn(width, generator=torch.Generator().manual_seed(1))
    before = _inputs(model, encoded)
    probe = torch.randn(width, generator=torch.Generator().manual_seed(2))
    scores = before[1][:, -1] @ probe  # the gate reads layer 1 before the add at the same layer
    threshold = scores.mean().item()  # the two prompts fall on either side
    expected_rows = scores > threshold
    assert expected_rows.any() and not expected_rows.all()
    steered = _prefill_inputs(model, encoded, gated_add_to_block_input(model, 1, vector, 0.5, 1, probe,
                                                                       threshold))
    shift = steered[1] - before[1]
    for row, flagged in enumerate(expected_rows.tolist()):
        expected = (0.5 * vector).expand_as(shift[row]) if flagged else torch.zeros_like(shift[row])
        torch.testing.assert_close(shift[row], expected, atol=1e-5, rtol=0)
    # the same as the explicit per-row vector, the form teacher-forced passes use
    per_row = expected_rows.float()[:, None] * vector
    explicit = _prefill_inputs(model, encoded, add_to_block_input(model, 1, per_row, 0.5))
    torch.testing.assert_close(explicit[1], steered[1], atol=1e-6, rtol=0)
    assert all(not block._forward_pre_hooks for block in decoder_layers(model))


def test_gated_generation_keeps_the_prefill_decision_while_decoding(make_tiny_model, tiny_tokenizer):
    model = make_tiny_model("llama")
    encoded = _encode(model, tiny_tokenizer)
    width = model.get_input_embeddings().weight.shape[-1]
    vector = 5 * torch.randn(width, generator=torch.Generator().manual_seed(3))
    scores = block_input_at_last_position(model, 1, encoded["input_ids"], encoded["attention_mask"]) @ vector
    threshold = scores.mean().item()
    rows = scores > threshold
    options = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": tiny_tokenizer.pad_token_id}
    with torch.no_grad(), gated_add_to_block_input(model, 1, vector, 1.0, 1, vector, threshold):
        gated = model.generate(**encoded, **options)
    with torch.no_grad(), add_to_block_input(model, 1, rows.float()[:, None] * vector):
        explicit = model.generate(**encoded, **options)
    assert torch.equal(gated, explicit)


def test_block_input_at_last_position_matches_a_full_forward(tiny_model, tiny_tokenizer):
    encoded = _encode(tiny_model, tiny_tokenizer)
    full = _inputs(tiny_model, encoded)
    for layer in full:
        read = block_input_at_last_position(tiny_model, layer, encoded["input_ids"],
                                            encoded["attention_mask"])
        torch.testing.assert_close(read, full[layer][:, -1], atol=1e-6, rtol=0)
        every = block_inputs_at_last_position(tiny_model, layer, encoded["input_ids"],
                                              encoded["attention_mask"])
        assert every.shape[1] == layer + 1
        for earlier in range(layer + 1):
            torch.testing.assert_close(every[:, earlier], full[earlier][:, -1], atol=1e-6, rtol=0)
    assert all(not block._forward_pre_hooks for block in decoder_layers(tiny_model))


def test_gate_must_read_before_the_steering_layer(tiny_model):
    width = tiny_model.get_input_embeddings().weight.shape[-1]
    with pytest.raises(SafesteerError, match="gate layer"), gated_add_to_block_input(
            tiny_model, 0, torch.ones(width), 1.0, 1, torch.ones(width), 0.0):
        pass
