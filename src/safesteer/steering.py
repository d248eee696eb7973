"""Activation interventions on the residual stream, scoped by context managers.

Every hook here is registered inside a ``with`` block and removed in ``finally``, so a steered
model is always the unmodified base model plus a hook that exists only while it is needed. The
same code serves direction extraction, candidate selection, generation and teacher scoring.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from typing import Any

import torch
from torch import nn

from safesteer.errors import SafesteerError
from safesteer.models.layout import decoder_layers, hidden_size
from safesteer.models.rendering import position_ids

_ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")
_MLP_NAMES = ("mlp", "feed_forward", "ffn")


def _split_hidden(args: tuple, kwargs: dict) -> tuple[torch.Tensor, bool]:
    """The block input, wherever transformers passed it (docs/method.md §9.5: it may be a keyword)."""
    if args:
        return args[0], True
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"], False
    raise SafesteerError("decoder block was called without hidden states; cannot steer it")


def _replace_hidden(args: tuple, kwargs: dict, new: torch.Tensor, positional: bool) -> tuple:
    if positional:
        return (new, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": new}


def _broadcastable(vector: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """Cast ``vector`` ([d] or per-row [batch, d]) to ``hidden``'s dtype/device, shaped to add."""
    vector = vector.to(device=hidden.device, dtype=hidden.dtype)
    if vector.dim() == 2:
        if vector.shape[0] != hidden.shape[0]:
            raise SafesteerError(
                f"per-row steering vector has {vector.shape[0]} rows, batch has {hidden.shape[0]}"
            )
        return vector[:, None, :]
    return vector


def _check_width(vector: torch.Tensor, model: nn.Module) -> None:
    width = hidden_size(model)
    if vector.shape[-1] != width:
        raise SafesteerError(
            f"steering vector has size {vector.shape[-1]} but the model's hidden size is {width}"
        )


@contextmanager
def add_to_block_input(
    model: nn.Module, layer: int, vector: torch.Tensor, coefficient: float = 1.0
) -> Iterator[None]:
    """ActAdd: ``x_layer <- x_layer + coefficient * vector`` at every position of every forward.

    ``vector`` is ``[d]`` or ``[batch, d]`` (one vector per row, for scoring several candidates in
    one batch). Padding positions are shifted too; attention masks them, so left padding is safe.
    With a KV cache only the new positions pass through the hook, and the cached ones were already
    steered, so generate() sees a consistently steered model.
    """
    blocks = decoder_layers(model)
    if not 0 <= layer < len(blocks):
        raise SafesteerError(f"steering layer {layer} is outside the model's {len(blocks)} blocks")
    _check_width(vector, model)
    scaled = vector.detach() * coefficient

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> tuple:
        hidden, positional = _split_hidden(args, kwargs)
        return _replace_hidden(args, kwargs, hidden + _broadcastable(scaled, hidden), positional)

    handle = blocks[layer].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def gated_add_to_block_input(model: nn.Module, layer: int, vector: torch.Tensor, coefficient: float,
                             gate_layer: int, gate_vector: torch.Tensor,
                             threshold: float) -> Iterator[None]:
    """ActAdd on the rows a linear probe flags: the conditional teacher at generation time.

    On every multi-token forward (a prefill, whose last position is the last prompt token of a
    left-padded batch) each row's block-``gate_layer`` input at the last position is projected on
    ``gate_vector``; rows scoring above ``threshold`` are steered, in that forward and in the
    one-token decoding forwards that follow. The gate reads unsteered activations, so
    ``gate_layer`` may not come after ``layer``. Teacher-forced passes over prompt + answer should
    read the gate on the prompt alone (``Direction.gate_rows``) and steer those rows
    (``Direction.steer(rows=...)``) instead (docs/method.md §4.2).
    """
    blocks = decoder_layers(model)
    if not 0 <= gate_layer <= layer < len(blocks):
        raise SafesteerError(f"gate layer {gate_layer} must be in 0..{layer} (the steering layer) and "
                             f"the steering layer below {len(blocks)}")
    _check_width(vector, model)
    _check_width(gate_vector, model)
    scaled = vector.detach() * coefficient
    state: dict[str, torch.Tensor] = {}

    def gate_hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = _split_hidden(args, kwargs)[0]
        if hidden.shape[1] > 1 or "rows" not in state:
            state["rows"] = probe_rows(hidden[:, -1], gate_vector, threshold)
        elif state["rows"].shape[0] != hidden.shape[0]:
            raise SafesteerError("gated steering: a decoding step changed the batch size; start a "
                                 "new generation (prefill) for a new batch")

    def steer_hook(_module: nn.Module, args: tuple, kwargs: dict) -> tuple:
        hidden, positional = _split_hidden(args, kwargs)
        rows = state["rows"].to(device=hidden.device, dtype=hidden.dtype)
        shift = rows[:, None, None] * scaled.to(device=hidden.device, dtype=hidden.dtype)
        return _replace_hidden(args, kwargs, hidden + shift, positional)

    with ExitStack() as stack:  # the gate first: at gate_layer == layer it must read before the add
        stack.callback(blocks[gate_layer].register_forward_pre_hook(gate_hook, with_kwargs=True).remove)
        stack.callback(blocks[layer].register_forward_pre_hook(steer_hook, with_kwargs=True).remove)
        yield


def probe_rows(hidden: torch.Tensor, gate_vector: torch.Tensor, threshold: float) -> torch.Tensor:
    """Which rows of ``hidden`` ``[batch, d]`` project on ``gate_vector`` above ``threshold``
    (float32 dot product); returns a bool ``[batch]``."""
    return hidden.float() @ gate_vector.to(device=hidden.device, dtype=torch.float32) > threshold


class _StopForward(Exception):
    """Raised by a hook once the activation it reads is captured: the later blocks are not run."""


@torch.inference_mode()
def block_inputs_at_last_position(model: nn.Module, last_layer: int, input_ids: torch.Tensor,
                                  attention_mask: torch.Tensor) -> torch.Tensor:
    """Blocks ``0..last_layer``'s inputs at the last position of a left-padded batch,
    ``[batch, last_layer + 1, d]``; the forward stops at block ``last_layer``, so probes on early
    layers cost a fraction of a full pass."""
    captured: list[torch.Tensor] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append(_split_hidden(args, kwargs)[0][:, -1].detach())
        if module is blocks[last_layer]:
            raise _StopForward

    blocks = decoder_layers(model)
    with ExitStack() as stack:
        for block in blocks[:last_layer + 1]:
            stack.callback(block.register_forward_pre_hook(hook, with_kwargs=True).remove)
        with suppress(_StopForward):
            model(input_ids=input_ids, attention_mask=attention_mask,
                  position_ids=position_ids(attention_mask), use_cache=False)
    if len(captured) != last_layer + 1:
        raise SafesteerError(f"block {last_layer} was not reached by the forward pass")
    return torch.stack(captured, 1)


def block_input_at_last_position(model: nn.Module, layer: int, input_ids: torch.Tensor,
                                 attention_mask: torch.Tensor) -> torch.Tensor:
    """Block ``layer``'s input at the last position of a left-padded batch, ``[batch, d]``."""
    return block_inputs_at_last_position(model, layer, input_ids, attention_mask)[:, -1]


def project_out(hidden: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    """``a - (a . u) u`` for unit ``u``, computed in float32 and returned in ``hidden``'s dtype."""
    unit = unit.to(device=hidden.device, dtype=torch.float32)
    as_float = hidden.float()
    return (as_float - (as_float @ unit)[..., None] * unit).to(hidden.dtype)


def _named_child(block: nn.Module, names: tuple[str, ...]) -> nn.Module:
    for name in names:
        child = getattr(block, name, None)
        if isinstance(child, nn.Module):
            return child
    raise SafesteerError(
        f"cannot find a submodule named one of {', '.join(names)} in {type(block).__name__}; "
        "directional ablation needs the attention and MLP outputs"
    )


@contextmanager
def ablate_direction(model: nn.Module, direction: torch.Tensor) -> Iterator[None]:
    """Remove the component along ``direction`` from every block input, attention and MLP output.

    This is Arditi et al.'s directional ablation, plus each block's output: models that normalise
    the attention/MLP output before the residual add (Gemma 2/3) could otherwise write the
    direction back through the norm's weight, and the last block's output reaches the logits.
    """
    _check_width(direction, model)
    unit = direction.detach().float() / (direction.detach().float().norm() + 1e-8)

    def pre_hook(_module: nn.Module, args: tuple, kwargs: dict) -> tuple:
        hidden, positional = _split_hidden(args, kwargs)
        return _replace_hidden(args, kwargs, project_out(hidden, unit), positional)

    def output_hook(_module: nn.Module, _args: tuple, output: Any) -> Any:
        if isinstance(output, tuple):
            return (project_out(output[0], unit), *output[1:])
        return project_out(output, unit)

    blocks = decoder_layers(model)
    outputs = [module for block in blocks
               for module in (_named_child(block, _ATTENTION_NAMES), _named_child(block, _MLP_NAMES), block)]
    with ExitStack() as stack:
        for block in blocks:
            stack.callback(block.register_forward_pre_hook(pre_hook, with_kwargs=True).remove)
        for module in outputs:
            stack.callback(module.register_forward_hook(output_hook).remove)
        yield


@contextmanager
def record_block_inputs(model: nn.Module) -> Iterator[dict[int, torch.Tensor]]:
    """Capture every block's input ``[batch, seq, d]`` of the latest forward, keyed by layer."""
    captured: dict[int, torch.Tensor] = {}

    def make_hook(index: int):
        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            captured[index] = _split_hidden(args, kwargs)[0].detach()

        return hook

    with ExitStack() as stack:
        for index, block in enumerate(decoder_layers(model)):
            handle = block.register_forward_pre_hook(make_hook(index), with_kwargs=True)
            stack.callback(handle.remove)
        yield captured
