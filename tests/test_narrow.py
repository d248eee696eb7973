"""Few-row linears as ``weight @ inputs.T`` (safesteer.models.narrow): same values, same answers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from safesteer.models.generation import generate_ids
from safesteer.models.narrow import NarrowLinears
from safesteer.models.rendering import encode_rendered, render_prompts

PROMPTS = ["Describe cats.", "Explain how rivers form, quickly please.", "Hi"]


@pytest.fixture
def narrow_products(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """The shapes of the products the narrow path computes (it is the only caller of torch.mm here)."""
    shapes: list[tuple[int, ...]] = []
    mm = torch.mm

    def counted(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        shapes.append((*left.shape, right.shape[1]))
        return mm(left, right)

    monkeypatch.setattr(torch, "mm", counted)
    return shapes


@pytest.mark.parametrize("bias", [False, True])
def test_a_narrow_product_is_the_linear_map(bias: bool, narrow_products: list[tuple[int, ...]]) -> None:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(3, 5, 16, generator=generator)
    weight = torch.randn(24, 16, generator=generator)
    offset = torch.randn(24, generator=generator) if bias else None
    reference = inputs.double() @ weight.double().T + (0 if offset is None else offset.double())
    with torch.no_grad(), NarrowLinears(max_rows=15):
        output = F.linear(inputs, weight, offset)
    assert narrow_products == [(24, 16, 15)]
    assert output.shape == (3, 5, 24) and output.is_contiguous() and output.dtype == torch.float32
    torch.testing.assert_close(output.double(), reference, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("case", ["too many rows", "autograd", "float64"])
def test_other_products_go_through_linear(case: str, narrow_products: list[tuple[int, ...]]) -> None:
    inputs = torch.randn(20 if case == "too many rows" else 4, 8,
                         dtype=torch.float64 if case == "float64" else torch.float32)
    weight = torch.randn(6, 8, dtype=inputs.dtype, requires_grad=case == "autograd")
    with torch.set_grad_enabled(case == "autograd"), NarrowLinears(max_rows=16):
        output = F.linear(inputs, weight)
    assert narrow_products == []
    torch.testing.assert_close(output, inputs @ weight.T)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])
def test_generation_with_narrow_products_keeps_logits_and_answers(
    arch: str, make_tiny_model: Callable[[str], PreTrainedModel], tiny_tokenizer: PreTrainedTokenizerBase,
    narrow_products: list[tuple[int, ...]],
) -> None:
    """generate_ids computes the decode steps' products narrow on a CPU; the greedy answers and
    every step's logits are those of plain ``generate`` (qwen2's projections carry a bias)."""
    model = make_tiny_model(arch).eval()
    batch = encode_rendered(tiny_tokenizer, render_prompts(tiny_tokenizer, PROMPTS), torch.device("cpu"))
    options: dict[str, Any] = {"max_new_tokens": 6, "do_sample": False,
                               "pad_token_id": tiny_tokenizer.pad_token_id}
    narrow = generate_ids(model, batch, **options)
    assert narrow_products, "the decode steps should take the narrow path"
    with torch.no_grad():
        plain = model.generate(**batch, output_logits=True, return_dict_in_generate=True, **options)
    assert torch.equal(narrow, plain.sequences[:, batch["input_ids"].shape[1]:])
    with torch.no_grad(), NarrowLinears():
        narrow_logits = model(**batch).logits[:, -1]
    torch.testing.assert_close(narrow_logits, plain.logits[0], rtol=1e-5, atol=1e-5)
