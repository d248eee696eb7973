"""Few-row linear layers on a CPU computed as ``weight @ inputs.T``: the same dot products in an
order the BLAS kernels read faster.

A decode step multiplies a handful of rows (one per answer) by every weight of the model, so
generation on a CPU is bound by how fast the matrix product streams the weights. For
``inputs @ weight.T`` with few input rows the float32 kernels stream them slowly; with the weight
as the tall left operand the larger projections and the output head run up to 1.6x faster, and
the closing check's answers 1.1-1.2x faster (docs/method.md §6.1). Larger products (prompts,
training passes) and any product under autograd go through ``torch.nn.functional.linear``.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from safesteer.models.layout import model_device
from safesteer.models.linears import LinearMode

# Decode batches have 16-32 rows by default; the gain shrinks as rows grow (benchmarks/bench_narrow.py).
MAX_ROWS = 64


class NarrowLinears(LinearMode):
    """Inside it, ``F.linear`` of at most ``max_rows`` float32 CPU rows without autograd is computed
    as ``(weight @ inputs.T).T`` (made contiguous, as ``F.linear`` returns it)."""

    def __init__(self, max_rows: int = MAX_ROWS) -> None:
        super().__init__()
        self.max_rows = max_rows

    def linear(self, input: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        if torch.is_grad_enabled() or not _narrow(input, weight, bias, self.max_rows):
            return F.linear(input, weight, bias)
        flat = input.reshape(-1, input.shape[-1])
        output = torch.mm(weight, flat.T).T.contiguous()
        if bias is not None:
            output += bias
        return output.reshape(*input.shape[:-1], weight.shape[0])


def _narrow(inputs: Tensor, weight: Tensor, bias: Tensor | None, max_rows: int) -> bool:
    """Whether the product is one this module measured: plain float32 CPU tensors, few rows."""
    tensors = [inputs, weight] if bias is None else [inputs, weight, bias]
    return (all(type(tensor) in (Tensor, nn.Parameter) and tensor.device.type == "cpu"
                and tensor.dtype == torch.float32 for tensor in tensors)
            and weight.dim() == 2 and inputs.dim() >= 1 and inputs.shape[-1] > 0
            and 0 < inputs.numel() // inputs.shape[-1] <= max_rows)


def narrow_linears(model: nn.Module) -> AbstractContextManager[Any]:
    """:class:`NarrowLinears` on ``model``'s linear layers when it is on the CPU
    (:meth:`~safesteer.models.linears.LinearMode.on`); nothing elsewhere (accelerators' kernels
    handle few rows well)."""
    return NarrowLinears().on(model) if model_device(model).type == "cpu" else nullcontext()
