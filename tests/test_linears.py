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


def test_routing_reaches_every_plain_linear_and_is_undone_on_error() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    mode = Counting()
    with mode.on(model):
        assert all("forward" in vars(layer) for layer in (model[0], model[2]))
        model(torch.ones(3, 4))
    assert mode.calls == 2
    with pytest.raises(RuntimeError), mode.on(model):
        raise RuntimeError("interrupted")
    assert not any("forward" in vars(module) for module in model.modules())
    model(torch.ones(3, 4))
    assert mode.calls == 2


class Expert(nn.Module):
    """A weight matrix outside any nn.Linear, multiplied by F.linear (as mixtures of experts do)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 4))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(inputs, self.weight)


@pytest.mark.parametrize("case", ["direct F.linear", "own forward"])
def test_a_model_whose_products_may_bypass_its_linears_gets_the_mode(case: str) -> None:
    model = nn.Sequential(nn.Linear(4, 4), Expert() if case == "direct F.linear" else nn.Linear(4, 4))
    if case == "own forward":  # as accelerate's hooks wrap a layer
        wrapped = model[1].forward
        model[1].forward = lambda inputs: wrapped(inputs)
    mode = Counting()
    with mode.on(model):
        model(torch.ones(3, 4))
    assert mode.calls == 2 and "forward" not in vars(model[0])
