"""Generation in bfloat16 products over float32 weights: ``--generation-dtype``.

Answers, rollouts and stage 3's samples are decode steps, and on a CPU a decode step is bound by
its matrix products. On CPUs with native bfloat16 (AVX512-BF16 or AMX) those products run several
times as fast in bfloat16 (``benchmarks/bench_roofline.py`` prints the peaks), while training
wants float32 weights. So the weights stay float32 and, while a model generates, each linear
product casts its input to bfloat16 and uses a bfloat16 copy of its weight, made once per
``generate`` call (a LoRA student's adapter is folded in float32 first, so the copy carries it);
norms, attention, the residual stream and the KV cache stay float32 (the logits are the output
head's bfloat16 product, returned in float32). The greedy answers part from float32's within a
few tokens, as answers in another dtype do; their refusal verdicts hardly move (docs/method.md
§6.1 gives the measured agreement and speed).

The chosen dtype is kept on the model by :func:`~safesteer.models.loading.load_model`, so every
caller of :func:`~safesteer.models.generation.generate_ids` gets it without passing it along.

Stage 3's ``--bf16`` trains under bfloat16 autocast instead (``--bf16=auto``: where
``--generation-dtype auto`` would pick bfloat16, :func:`resolve_bf16`); :class:`FrozenWeightCasts`
keeps the frozen weights' bfloat16 copies there, which autocast would make again at every forward.
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from safesteer.config import GENERATION_DTYPES
from safesteer.models.linears import LinearMode
from safesteer.models.narrow import narrow_linears

logger = logging.getLogger(__name__)

# The attribute load_model sets; a PeftModel forwards the lookup to the model it wraps.
_ATTRIBUTE = "safesteer_generation_dtype"


def native_bfloat16_cpu() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX); without it bfloat16
    products are emulated and slower than float32."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, check, lambda: False)() for check in checks)


def resolve_generation_dtype(name: str, weights: torch.dtype, device: torch.device) -> torch.dtype | None:
    """The products' dtype while generating, or None for the weights' own.

    ``model``: the weights' own. ``bfloat16``: bfloat16 products over float32 weights (weights
    already in a 16-bit dtype are used as they are). ``auto``: ``bfloat16`` for float32 weights
    on a CPU with native bfloat16, else the weights' own, so results depend on the CPU only
    where it pays.
    """
    if name not in GENERATION_DTYPES:
        raise ValueError(f"generation dtype {name!r}: expected one of {', '.join(GENERATION_DTYPES)}")
    if weights != torch.float32 or name == "model":
        return None
    if name == "auto" and not (device.type == "cpu" and native_bfloat16_cpu()):
        return None
    return torch.bfloat16


def resolve_bf16(setting: bool | str, weights: torch.dtype, device: torch.device) -> bool:
    """Whether stage 3's teacher-forced passes run under bfloat16 autocast (``--bf16``): as set,
    or for ``auto`` where ``--generation-dtype auto`` picks bfloat16 (float32 weights on a CPU
    with native bfloat16), where the faster products pay for the copies; elsewhere ``auto`` leaves
    results as they were."""
    if setting != "auto":
        return bool(setting)
    chosen = resolve_generation_dtype("auto", weights, device) == torch.bfloat16
    logger.info("--bf16=auto: %s in stage 3's teacher-forced passes",
                "bfloat16 autocast" if chosen else "the weights' own products")
    return chosen


def set_generation_dtype(model: nn.Module, dtype: torch.dtype | None) -> None:
    setattr(model, _ATTRIBUTE, dtype)


def generation_dtype(model: nn.Module) -> torch.dtype | None:
    """What :func:`set_generation_dtype` recorded on ``model`` (or the model it wraps), else None."""
    return getattr(model, _ATTRIBUTE, None)


def generation_dtype_name(model: nn.Module) -> str:
    """The dtype ``model``'s products run in while it generates, by name, for a run's records."""
    dtype = generation_dtype(model) or next(model.parameters()).dtype
    return str(dtype).removeprefix("torch.")


class BfloatProducts(LinearMode):
    """Inside it, ``F.linear`` on float32 weights without autograd is computed as
    ``F.linear(inputs.bfloat16(), bfloat16 copy of weight)`` and returned in float32 (bias added
    in float32). Each weight is copied once for the life of the mode."""

    def linear(self, input: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        if torch.is_grad_enabled() or weight.dtype != torch.float32:
            return F.linear(input, weight, bias)
        output = F.linear(input.to(torch.bfloat16), self.copies.get(weight, torch.bfloat16)).float()
        return output if bias is None else output + bias


class FrozenWeightCasts(LinearMode):
    """Under autocast, ``F.linear`` of a frozen float32 weight reads a copy in autocast's dtype
    kept across forwards (docs/method.md §6.1).

    Autocast keeps only the casts of weights that take a gradient, so each teacher-forced forward
    would otherwise cast the whole frozen model again. The copy is the cast autocast makes, so the
    products are the same bit for bit. (Sharing one cast of an input among the products that read
    it would not be: its gradient would then add up in bfloat16.)
    """

    def linear(self, input: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        device = input.device.type
        if (torch.is_autocast_enabled(device) and weight.dtype == torch.float32
                and not weight.requires_grad and weight.device.type == device):
            weight = self.copies.get(weight, torch.get_autocast_dtype(device))
        return F.linear(input, weight, bias)


def generation_products(model: nn.Module) -> AbstractContextManager[Any]:
    """How ``model``'s linear products run while it generates: :class:`BfloatProducts` when its
    generation dtype is bfloat16, else :func:`~safesteer.models.narrow.narrow_linears`; routed
    through its linear layers (:meth:`~safesteer.models.linears.LinearMode.on`), not as a mode."""
    if generation_dtype(model) == torch.bfloat16:
        return BfloatProducts().on(model)
    return narrow_linears(model)

