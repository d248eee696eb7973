"""A KV cache with room for the tokens to come (safesteer.models.kvcache): what transformers'
dynamic cache holds, written in place, and the same generated tokens."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from safesteer.models import generation
from safesteer.models.generation import generate_ids
from safesteer.models.kvcache import RoomyLayer, generation_cache, with_room
from safesteer.models.rendering import encode_rendered, render_prompts

PROMPTS = ["Describe cats.", "Explain how rivers form, quickly please.", "Hi"]


def _states(generator: torch.Generator, length: int, rows: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.randn(rows, 2, length, 4, generator=generator),
            torch.randn(rows, 2, length, 4, generator=generator))


def test_a_roomy_layer_holds_what_a_dynamic_layer_holds_in_place_until_its_room_runs_out() -> None:
    generator = torch.Generator().manual_seed(0)
    plain, roomy = DynamicLayer(), RoomyLayer(reserve=3)
    pointers = []
    for length in (5, 1, 1, 1, 1, 2):
        keys, values = _states(generator, length)
        expected = plain.update(keys, values)
        held = roomy.update(keys, values)
        assert all(torch.equal(a, b) for a, b in zip(expected, held, strict=True))
        assert roomy.get_seq_length() == plain.get_seq_length()
        pointers.append(held[0].data_ptr())
    # the prefill's buffer takes the next 3 tokens in place; the 4th and the 2 after get a new one
    assert len(set(pointers[:4])) == 1 and pointers[4] != pointers[3] and pointers[5] == pointers[4]


@pytest.mark.parametrize("change", ["crop", "reorder", "select", "repeat", "reset"])
def test_after_the_parent_class_replaces_its_tensors_a_roomy_layer_goes_on_from_them(change: str) -> None:
    generator = torch.Generator().manual_seed(1)
    plain, roomy = DynamicLayer(), RoomyLayer(reserve=8)
    for layer in (plain, roomy):
        layer.update(*_states(torch.Generator().manual_seed(2), 6))
        if change == "crop":
            layer.crop(-2)
        elif change == "reorder":
            layer.reorder_cache(torch.tensor([2, 0, 1]))
        elif change == "select":
            layer.batch_select_indices(torch.tensor([0, 2]))
        elif change == "repeat":
            layer.batch_repeat_interleave(2)
        else:
            layer.reset()
    # cropping leaves a view of the buffers, which go on; the rest let them go
    assert (roomy.buffers is not None) == (change == "crop")
    states = _states(generator, 1, rows=3 if plain.keys is None else plain.keys.shape[0])
    assert all(torch.equal(a, b) for a, b in zip(plain.update(*states), roomy.update(*states), strict=True))


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_generation_with_room_draws_the_plain_caches_tokens_bit_for_bit(
    arch: str, make_tiny_model: Callable[[str], PreTrainedModel], tiny_tokenizer: PreTrainedTokenizerBase,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Greedy and sampled, on full-attention and (gemma2) sliding-window layers, whose layers stay
    transformers' own."""
    updates: list[int] = []
    update = RoomyLayer.update

    def counted(self: RoomyLayer, *args: object, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        updates.append(1)
        return update(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(RoomyLayer, "update", counted)
    model = make_tiny_model(arch)
    batch = encode_rendered(tiny_tokenizer, render_prompts(tiny_tokenizer, PROMPTS), torch.device("cpu"))
    for sampling in ({"do_sample": False}, {"do_sample": True, "top_k": 0}):
        options = {"max_new_tokens": 7, "pad_token_id": tiny_tokenizer.pad_token_id, **sampling}
        torch.manual_seed(0)
        ours = generate_ids(model, batch, **options)
        assert updates
        with monkeypatch.context() as patch:  # the same products, transformers' own cache
            patch.setattr(generation, "generation_cache", lambda *_: None)
            torch.manual_seed(0)
            plain = generate_ids(model, batch, **options)
        assert torch.equal(ours, plain)
        updates.clear()
    kinds = {type(layer) for layer in generation_cache(model, 7).layers}
    assert kinds == ({RoomyLayer} if arch == "llama" else {RoomyLayer, DynamicSlidingWindowLayer})


def test_only_dynamic_layers_get_room_and_a_chosen_cache_implementation_is_left_to_generate(
    tiny_model: PreTrainedModel, tiny_tokenizer: PreTrainedTokenizerBase, monkeypatch: pytest.MonkeyPatch,
) -> None:
    cache = with_room(DynamicCache(), 4)
    cache.update(*_states(torch.Generator().manual_seed(3), 2), layer_idx=0)  # layers made as updates come
    assert [type(layer) for layer in cache.layers] == [RoomyLayer]
    handed: list[object] = []
    generate = type(tiny_model).generate
    monkeypatch.setattr(type(tiny_model), "generate",
                        lambda self, **kwargs: handed.append(kwargs) or generate(self, **kwargs))
    batch = encode_rendered(tiny_tokenizer, render_prompts(tiny_tokenizer, PROMPTS), torch.device("cpu"))
    generate_ids(tiny_model, batch, max_new_tokens=2, pad_token_id=0, cache_implementation="static")
    assert not {"cache", "past_key_values"} & handed[0].keys()  # type: ignore[attr-defined]
