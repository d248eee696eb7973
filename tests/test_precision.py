"""Generation in bfloat16 products over float32 weights (safesteer.models.precision)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from safesteer.config import ModelArguments
from safesteer.errors import SafesteerError
from safesteer.models import precision
from safesteer.models.generation import generate_ids
from safesteer.models.loading import load_model
from safesteer.models.precision import (
    BfloatProducts,
    FrozenWeightCasts,
    generation_dtype,
    resolve_bf16,
    resolve_generation_dtype,
    set_generation_dtype,
)
from safesteer.models.rendering import encode_rendered, render_prompts

PROMPTS = ["Describe cats.", "Explain how rivers form, quickly please.", "Hi"]
CPU = torch.device("cpu")


class RoundedLinear(nn.Module):
    """The reference: a linear map of bfloat16-rounded input and weight, back in float32."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.linear = linear

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        output = F.linear(inputs.to(torch.bfloat16), self.linear.weight.to(torch.bfloat16)).float()
        return output if self.linear.bias is None else output + self.linear.bias


def rounded_copy(model: nn.Module) -> nn.Module:
    reference = copy.deepcopy(model)
    for name, module in list(reference.named_modules()):
        if isinstance(module, nn.Linear):
            parent, _, child = name.rpartition(".")
            setattr(reference.get_submodule(parent), child, RoundedLinear(module))
    return reference


@pytest.mark.parametrize("bias", [False, True])
def test_a_bfloat_product_rounds_input_and_weight_and_copies_the_weight_once(bias: bool) -> None:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(3, 5, 64, generator=generator)
    weight = torch.randn(24, 64, generator=generator)
    offset = torch.randn(24, generator=generator) if bias else None
    exact = inputs.double() @ weight.double().T + (0 if offset is None else offset.double())
    rounded = (inputs.bfloat16().double() @ weight.bfloat16().double().T).bfloat16().double()
    rounded = rounded + (0 if offset is None else offset.double())
    mode = BfloatProducts()
    with torch.no_grad(), mode:
        output = F.linear(inputs, weight, offset)
        again = F.linear(inputs, weight, offset)
    assert output.dtype == torch.float32 and output.shape == (3, 5, 24)
    assert torch.equal(output, again) and len(mode.copies) == 1
    # within a bfloat16 rounding of the rounded operands' product (8 bits), not float32's
    torch.testing.assert_close(output.double(), rounded, rtol=8e-3, atol=1e-2)
    assert (output.double() - exact).abs().max() > 1e-3


def test_a_weight_whose_values_are_swapped_in_gets_a_copy_of_each() -> None:
    """A folded adapter replaces a parameter's ``.data`` without touching its version counter: the
    products must follow the values, not keep the first copy."""
    weight = nn.Parameter(torch.randn(6, 8), requires_grad=False)
    original, folded = weight.data, torch.randn(6, 8)
    inputs = torch.randn(2, 8)
    mode = BfloatProducts()
    with torch.no_grad(), mode:
        before = F.linear(inputs, weight)
        weight.data = folded
        swapped = F.linear(inputs, weight)
        weight.data = original
        after = F.linear(inputs, weight)
    assert torch.equal(before, after) and len(mode.copies) == 2
    torch.testing.assert_close(swapped, inputs @ folded.T, rtol=2e-2, atol=5e-2)
    assert not torch.allclose(swapped, before, rtol=2e-2, atol=5e-2)


@pytest.mark.parametrize("case", ["autograd", "float64"])
def test_other_products_are_left_alone(case: str) -> None:
    dtype = torch.float64 if case == "float64" else torch.float32
    inputs = torch.randn(4, 8, dtype=dtype)
    weight = torch.randn(6, 8, dtype=dtype, requires_grad=case == "autograd")
    mode = BfloatProducts()
    with torch.set_grad_enabled(case == "autograd"), mode:
        output = F.linear(inputs, weight)
    assert len(mode.copies) == 0 and output.dtype == dtype
    torch.testing.assert_close(output, inputs @ weight.T)


def _adapted_linear_loss(inputs: torch.Tensor, frozen: torch.Tensor, low: torch.Tensor,
                         high: torch.Tensor) -> torch.Tensor:
    """A LoRA-shaped product under bfloat16 autocast: a frozen weight plus a trainable low-rank pair."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = F.linear(inputs, frozen) + F.linear(F.linear(inputs, low), high)
    return output.float().square().mean()


def test_frozen_weight_casts_match_autocast_bit_for_bit_and_cast_once() -> None:
    """The kept copy is autocast's own cast: the loss and every gradient equal plain autocast's,
    the frozen weight is cast once over two forwards and again after it changes in place, and
    weights that take a gradient are left to autocast."""
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(6, 32, generator=generator, requires_grad=True)
    frozen = torch.randn(48, 32, generator=generator)
    low = torch.randn(4, 32, generator=generator, requires_grad=True)
    high = torch.randn(48, 4, generator=generator, requires_grad=True)
    trainable = (inputs, low, high)

    def run(mode: FrozenWeightCasts | None) -> list[torch.Tensor]:
        losses = []
        for _ in range(2):
            with mode if mode is not None else torch.enable_grad():
                loss = _adapted_linear_loss(inputs, frozen, low, high)
            losses.append(loss.detach())
        gradients = torch.autograd.grad(loss, trainable)
        return losses + list(gradients)

    reference = run(None)
    mode = FrozenWeightCasts()
    cached = run(mode)
    for expected, actual in zip(reference, cached, strict=True):
        assert torch.equal(expected, actual)
    assert [id(weight) for weight in mode.copies.originals()] == [id(frozen)]
    copy = mode.copies.get(frozen, torch.bfloat16)
    run(mode)
    assert mode.copies.get(frozen, torch.bfloat16) is copy
    with torch.no_grad():
        frozen.mul_(2)
    again = run(mode)
    assert again[0] != reference[0] and torch.equal(again[0], run(None)[0])
    with mode:  # outside autocast: float32, no copy made
        assert F.linear(inputs, torch.randn(3, 32)).dtype == torch.float32
    assert len(mode.copies) == 1


@pytest.mark.parametrize(("name", "weights", "device", "native", "expected"), [
    ("model", torch.float32, CPU, True, None),
    ("bfloat16", torch.float32, CPU, False, torch.bfloat16),
    ("bfloat16", torch.bfloat16, CPU, True, None),
    ("auto", torch.float32, CPU, True, torch.bfloat16),
    ("auto", torch.float32, CPU, False, None),
    ("auto", torch.float32, torch.device("meta"), True, None),
])
def test_the_generation_dtype_resolves(name: str, weights: torch.dtype, device: torch.device, native: bool,
                                       expected: torch.dtype | None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision, "native_bfloat16_cpu", lambda: native)
    assert resolve_generation_dtype(name, weights, device) == expected


@pytest.mark.parametrize(("setting", "weights", "device", "native", "expected"), [
    (True, torch.float32, CPU, False, True),
    (False, torch.float32, CPU, True, False),
    ("auto", torch.float32, CPU, True, True),
    ("auto", torch.float32, CPU, False, False),
    ("auto", torch.bfloat16, CPU, True, False),
    ("auto", torch.float32, torch.device("meta"), True, False),
])
def test_bf16_resolves_auto_where_generation_dtype_auto_picks_bfloat16(
        setting: bool | str, weights: torch.dtype, device: torch.device, native: bool, expected: bool,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision, "native_bfloat16_cpu", lambda: native)
    assert resolve_bf16(setting, weights, device) is expected
    generation = resolve_generation_dtype("auto", weights, device) == torch.bfloat16
    assert setting != "auto" or generation is expected


def test_an_unknown_generation_dtype_is_refused() -> None:
    with pytest.raises(ValueError, match="float16"):
        resolve_generation_dtype("float16", torch.float32, CPU)
    with pytest.raises(SafesteerError, match="--generation-dtype must be one of model, auto, bfloat16"):
        ModelArguments(generation_dtype="float16")


def test_load_model_records_the_generation_dtype(tiny_model_dir: Path) -> None:
    model, _ = load_model(ModelArguments(model=str(tiny_model_dir), generation_dtype="bfloat16"))
    assert generation_dtype(model) == torch.bfloat16
    model, _ = load_model(ModelArguments(model=str(tiny_model_dir)))
    assert generation_dtype(model) is None


def test_generation_runs_in_bfloat16_products_through_a_lora_wrapper(
    make_tiny_model: Callable[[str], PreTrainedModel], tiny_tokenizer: PreTrainedTokenizerBase,
    record_bfloat_products: Callable[[object], list[BfloatProducts]],
) -> None:
    """generate_ids reads the dtype through a PeftModel, copies every linear weight once and answers
    as the rounded reference does; the logits are the reference's bit for bit and not float32's."""
    modes = record_bfloat_products(precision)
    model = make_tiny_model("llama").eval()
    reference = rounded_copy(model)
    weights = {id(module.weight) for module in model.modules() if isinstance(module, nn.Linear)}
    set_generation_dtype(model, torch.bfloat16)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    student = get_peft_model(model, lora)
    batch = encode_rendered(tiny_tokenizer, render_prompts(tiny_tokenizer, PROMPTS), CPU)
    options = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": tiny_tokenizer.pad_token_id}
    with student.disable_adapter():
        answers = generate_ids(student, batch, **options)
        with torch.no_grad():
            expected = reference.generate(**batch, **options)[:, batch["input_ids"].shape[1]:]
            with BfloatProducts():
                logits = student(**batch).logits
            assert torch.equal(logits, reference(**batch).logits)
            assert not torch.allclose(logits, student(**batch).logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(answers, expected)
    assert {id(weight) for weight in modes[0].copies.originals()} == weights
