"""A model's linear products computed another way, two ways of applying it: as a torch function
mode over ``F.linear`` (any caller's products), or on one model by routing its ``nn.Linear``
layers' forwards (:meth:`LinearMode.on`), which gives the same products without sending every
other operation through the mode's Python dispatch. A decode step is many small operations, so
generation takes the routed way: bfloat16 sampling on the embedded default ran 1.09x as fast,
the tokens bit for bit the same (docs/method.md §6.1).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode


class WeightCopies:
    """Weights copied to a lower dtype once, and again only after the weight changes in place.

    A copy belongs to the weight's storage as well as to the weight: a folded adapter is swapped in
    as the parameter's ``.data`` (:class:`~safesteer.models.loading.FoldedAdapters`), which leaves
    its version counter alone, so the base model's and the student's values each keep their copy.
    """

    def __init__(self) -> None:
        # Keyed by id and storage, with the weight and its storage kept: a freed tensor's id or
        # address may be reused.
        self.kept: dict[tuple[int, int], tuple[Tensor, int, Tensor, Tensor]] = {}

    def __len__(self) -> int:
        return len(self.kept)

    def originals(self) -> list[Tensor]:
        return [weight for weight, _, _, _ in self.kept.values()]

    def get(self, weight: Tensor, dtype: torch.dtype) -> Tensor:
        key = (id(weight), weight.data_ptr())
        kept = self.kept.get(key)
        if kept is None or kept[0] is not weight or kept[1] != weight._version or kept[3].dtype != dtype:
            values = weight.detach()
            kept = self.kept[key] = (weight, weight._version, values, values.to(dtype))
        return kept[3]


class LinearMode(TorchFunctionMode):
    """A mode that computes ``F.linear`` its own way (:meth:`linear`), with the weights' lower-dtype
    copies it makes kept in ``copies`` for its life; every other function runs as usual."""

    def __init__(self) -> None:
        super().__init__()
        self.copies = WeightCopies()

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        return self.linear(*args, **kwargs) if func is F.linear else func(*args, **kwargs)

    def linear(self, input: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        return F.linear(input, weight, bias)

    @contextmanager
    def on(self, model: nn.Module) -> Iterator[nn.Module]:
        """Within it, the products of ``model``'s ``nn.Linear`` layers are :meth:`linear`'s, as
        under the mode; nothing else is intercepted. A model whose products may not all come from
        plain ``nn.Linear`` layers (:func:`_routable`) gets the mode instead, so the products
        are the mode's either way."""
        if not _routable(model):
            with self:
                yield model
            return
        layers = [module for module in model.modules() if type(module).forward is nn.Linear.forward]
        for layer in layers:
            layer.forward = partial(_routed_forward, self, layer)
        try:
            yield model
        finally:
            for layer in layers:
                del layer.forward


def _routable(model: nn.Module) -> bool:
    """Whether every weight matrix of ``model`` sits in a plain ``nn.Linear`` or an embedding and
    no layer has a forward of its own: else some products may call ``F.linear`` directly (mixtures
    of experts, DoRA adapters, layers wrapped by accelerate's hooks, a routing already on)."""
    for module in model.modules():
        if "forward" in vars(module) or any(getattr(module, "use_dora", {}).values()):
            return False
        if type(module).forward is nn.Linear.forward or isinstance(module, nn.Embedding):
            continue
        if any(parameter.dim() >= 2 for parameter in module.parameters(recurse=False)):
            return False
    return True


def _routed_forward(mode: LinearMode, layer: nn.Linear, input: Tensor) -> Tensor:
    # The weight and bias are read at each call: a folded adapter swaps the weight's values in.
    return mode.linear(input, layer.weight, layer.bias)
