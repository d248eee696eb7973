"""The KV cache generation runs on: transformers' dynamic cache with room reserved for the tokens
to come, so that a decode step writes its keys and values in place.

transformers' ``DynamicLayer`` appends each step's keys and values with ``torch.cat``, which copies
the whole cache at every step: for 40 answers after prompts of up to 368 tokens, generation on a
CPU ran 1.07-1.16x as fast without that copying. :class:`RoomyLayer` keeps them in buffers sized for the
prompt plus the tokens to generate and hands attention a view of the filled part; attention reads
the same values, and on a CPU the tokens were the same bit for bit (docs/method.md §6.1). The
whole room is taken at the start, so rows that stop early no longer shrink the cache's peak.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

from torch import Tensor, nn
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer

CacheT = TypeVar("CacheT")


def _transformers_model(model: nn.Module) -> PreTrainedModel | None:
    """The first transformers model inside any wrapper (PEFT, DDP)."""
    return next((module for module in model.modules() if isinstance(module, PreTrainedModel)), None)


def cache_keyword(model: nn.Module) -> str:
    """The name ``forward`` takes (and returns) a KV cache by: ``cache`` since transformers 5.24,
    which deprecates ``past_key_values``."""
    inner = _transformers_model(model) or model
    return "cache" if "cache" in inspect.signature(type(inner).forward).parameters else "past_key_values"


def _dropping_buffers(name: str) -> Callable[..., Any]:
    """``DynamicLayer``'s method ``name``, which replaces the layer's tensors, first letting go of
    the buffers they were views of."""
    def method(self: RoomyLayer, *args: Any, **kwargs: Any) -> Any:
        self.buffers = None
        return getattr(DynamicLayer, name)(self, *args, **kwargs)
    return method


class RoomyLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys and values fill buffers with room for ``reserve`` more tokens
    than the first update brings, written in place; ``keys`` and ``values`` are views of the filled
    part. When the room runs out the buffers are made anew around what the layer holds; the parent
    class's methods that replace the tensors (reordering, selecting rows, offloading, reset) drop
    them, so no stale buffer outlives them (cropping keeps a view of the filled part, and the
    buffers)."""

    def __init__(self, reserve: int) -> None:
        super().__init__()
        self.reserve = reserve
        self.buffers: tuple[Tensor, Tensor] | None = None

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any,
               **kwargs: Any) -> tuple[Tensor, Tensor]:
        if self.keys is None:  # the first update, in either major version of transformers
            _initialize(self, key_states, value_states)
        length = self.get_seq_length()
        end = length + key_states.shape[-2]
        if not self._fits(key_states, end):
            self.buffers = tuple(  # type: ignore[assignment]
                _buffer(held, new, length, end + self.reserve)
                for held, new in ((self.keys, key_states), (self.values, value_states)))
        assert self.buffers is not None
        keys, values = self.buffers
        keys[..., length:end, :] = key_states
        values[..., length:end, :] = value_states
        self.keys, self.values = keys[..., :end, :], values[..., :end, :]
        return self.keys, self.values

    def _fits(self, key_states: Tensor, end: int) -> bool:
        """Whether the buffers still hold this layer's keys at their start, with room up to ``end``
        for states of this shape, dtype and device."""
        if self.buffers is None or self.keys.numel() == 0:
            return False
        keys = self.buffers[0]
        return (self.keys.data_ptr() == keys.data_ptr() and self.keys.shape[:-2] == keys.shape[:-2]
                and keys.shape[:-2] == key_states.shape[:-2] and end <= keys.shape[-2]
                and (keys.dtype, keys.device) == (key_states.dtype, key_states.device))

    reorder_cache = _dropping_buffers("reorder_cache")
    batch_select_indices = _dropping_buffers("batch_select_indices")
    batch_repeat_interleave = _dropping_buffers("batch_repeat_interleave")
    offload = _dropping_buffers("offload")
    reset = _dropping_buffers("reset")


# Before transformers 5, DynamicLayer's lazy initialisation reads the keys alone.
_INITIALIZED_FROM_VALUES = "value_states" in inspect.signature(DynamicLayer.lazy_initialization).parameters


def _initialize(layer: DynamicLayer, key_states: Tensor, value_states: Tensor) -> None:
    if _INITIALIZED_FROM_VALUES:
        layer.lazy_initialization(key_states, value_states)
    else:
        layer.lazy_initialization(key_states)  # type: ignore[call-arg]


def _buffer(held: Tensor, new: Tensor, length: int, capacity: int) -> Tensor:
    buffer = new.new_empty(*new.shape[:-2], capacity, new.shape[-1])
    if length:
        buffer[..., :length, :] = held
    return buffer


def with_room(cache: CacheT, reserve: int) -> CacheT:
    """``cache``, changed in place: each plain dynamic layer made a :class:`RoomyLayer` holding
    the same state, with room for ``reserve`` more tokens; any other cache or layer
    (sliding-window, static, quantized) is left as it is."""
    if not isinstance(cache, DynamicCache):
        return cache
    if getattr(cache, "layer_class_to_replicate", None) is DynamicLayer:  # layers made as updates come
        cache.layer_class_to_replicate = partial(RoomyLayer, reserve)
    for index, layer in enumerate(cache.layers):
        if type(layer) is DynamicLayer:
            roomy = RoomyLayer(reserve)
            roomy.__dict__.update({**vars(layer), "reserve": reserve, "buffers": None})
            cache.layers[index] = roomy
    return cache


def generation_cache(model: nn.Module, reserve: int) -> DynamicCache | None:
    """A fresh dynamic cache for ``model``'s generate call with room for ``reserve`` new tokens, or
    None where transformers would not give the model a dynamic cache (an encoder-decoder, or a
    cache implementation its generation config names), so that ``generate`` builds its own."""
    inner = _transformers_model(model)
    if inner is None or inner.config.is_encoder_decoder:
        return None
    # transformers' own rule for which models take a dynamic cache (a few recurrent ones do not)
    if not getattr(inner, "_supports_default_dynamic_cache", lambda: True)():
        return None
    if getattr(inner.generation_config, "cache_implementation", None) is not None:
        return None
    return with_room(DynamicCache(config=inner.config.get_text_config(decoder=True)), reserve)
