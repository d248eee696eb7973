"""A model's linear products routed through its layers (safesteer.models.linears): the mode's
products bit for bit, the layers put back as they were."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from safesteer.models.linears import LinearMode
from safesteer.models.narrow import NarrowLinears
from safesteer.models.precision import BfloatProducts
from safesteer.models.rendering import encode_rendered, render_prompts

PROMPTS = ["Describe cats.", "Explain how rivers form, quickly please.", "Hi"]


class Counting(LinearMode):
    """Counts the products it computes."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def linear(self, input: torch.Tensor, weight: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
        self.calls += 1
        return super().linear(input, weight, bias)


@pytest.mark.parametrize("make_mode", [BfloatProducts, NarrowLinears], ids=["bfloat16", "narrow"])
def test_routed_products_sample_the_modes_tokens_bit_for_bit(
    make_mode: Callable[[], LinearMode], make_tiny_model: Callable[[str], PreTrainedModel],
    tiny_tokenizer: PreTrainedTokenizerBase,
) -> None:
    model = make_tiny_model("llama").eval()
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    student = get_peft_model(model, lora)
    batch = encode_rendered(tiny_tokenizer, render_prompts(tiny_tokenizer, PROMPTS), torch.device("cpu"))
    options = {"max_new_tokens": 6, "do_sample": True, "top_k": 0,
               "pad_token_id": tiny_tokenizer.pad_token_id}

    def sample(context: object) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(0)
        with torch.no_grad(), context:  # type: ignore[attr-defined]
            return student(**batch).logits, student.generate(**batch, **options)

    mode_logits, mode_tokens = sample(make_mode())
    routed_logits, routed_tokens = sample(make_mode().on(student))
    assert torch.equal(routed_logits, mode_logits) and torch.equal(routed_tokens, mode_tokens)
    if make_mode is BfloatProducts:  # rounded products: not float32's (narrow ones may equal them)
        assert not torch.equal(routed_logits, sample(torch.no_grad())[0])
    assert not any("forward" in vars(module) for module in student.modules())


def test_routing_reaches_every_plain_linear_leaves_own_forwards_and_is_undone_on_error() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.Linear(4, 2))
    own = model[2]
    own.forward = lambda inputs: torch.zeros(*inputs.shape[:-1], 4)  # as accelerate's hooks wrap one
    mode = Counting()
    with mode.on(model):
        output = model(torch.ones(3, 4))
    assert mode.calls == 2 and torch.equal(output, model[3](torch.zeros(3, 4)))
    with pytest.raises(RuntimeError), mode.on(model):
        raise RuntimeError("interrupted")
    assert "forward" not in vars(model[0]) and "forward" not in vars(model[3]) and "forward" in vars(own)
    model(torch.ones(3, 4))
    assert mode.calls == 2
