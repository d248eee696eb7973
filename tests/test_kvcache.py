"""A KV cache with room for the tokens to come (safesteer.models.kvcache): what transformers'
dynamic cache holds, written in place, and the same generated tokens."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

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


@pytest.mark.parametrize("change", ["crop", "reorder", "select"])
def test_after_the_parent_class_replaces_its_tensors_a_roomy_layer_goes_on_from_them(change: str) -> None:
    generator = torch.Generator().manual_seed(1)
    plain, roomy = DynamicLayer(), RoomyLayer(reserve=8)
    for layer in (plain, roomy):
        layer.update(*_states(torch.Generator().manual_seed(2), 6))
        if change == "crop":
            layer.crop(-2)
        elif change == "reorder":
            layer.reorder_cache(torch.tensor([2, 0, 1]))
        else:
            layer.batch_select_indices(torch.tensor([0, 2]))
    states = _states(generator, 1, rows=plain.keys.shape[0])
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
        torch.manual_seed(0)
        with torch.no_grad():
            plain = model.generate(**batch, **options)[:, batch["input_ids"].shape[1]:]
        assert torch.equal(ours, plain) and updates
        updates.clear()
    kinds = {type(layer) for layer in generation_cache(model, 7).layers}
    assert kinds == ({RoomyLayer} if arch == "llama" else {RoomyLayer, DynamicSlidingWindowLayer})


def test_only_dynamic_caches_get_room() -> None:
    cache = DynamicCache()
    assert with_room(cache, 4) is cache
    cache.update(*_states(torch.Generator().manual_seed(3), 2), layer_idx=0)  # layers made as updates come
    assert [type(layer) for layer in cache.layers] == [RoomyLayer]
    other = object()
    assert with_room(other, 4) is other
