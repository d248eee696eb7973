"""Where things are in a model of any architecture: its decoder blocks, its sizes, its device."""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

from safesteer.errors import SafesteerError

_LAYER_LIST_NAMES = ("layers", "h", "blocks", "layer")
_CONTEXT_NAMES = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def _text_config(model: nn.Module) -> PretrainedConfig:
    """The decoder's config, also for multimodal models that nest it as ``text_config``."""
    config: PretrainedConfig = model.config  # type: ignore[assignment]
    return config.get_text_config()


def _config_int(model: nn.Module, names: tuple[str, ...]) -> int:
    config = _text_config(model)
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise SafesteerError(f"{type(config).__name__} has none of {', '.join(names)}")


def num_layers(model: nn.Module) -> int:
    return _config_int(model, ("num_hidden_layers", "n_layer", "num_layers"))


def context_length(model: nn.Module) -> int | None:
    """Tokens the model attends over, prompt and answer together; None when its config says not."""
    try:
        return _config_int(model, _CONTEXT_NAMES)
    except SafesteerError:
        return None


def hidden_size(model: nn.Module) -> int:
    """Width of the residual stream (d_model)."""
    return _config_int(model, ("hidden_size", "n_embd", "d_model"))


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder blocks, found without knowing the architecture.

    Candidates are ModuleLists as long as the text config's layer count. Preferred, in order: lists
    beside the input embeddings (which rules out vision towers of equal depth), lists named like
    layer stacks, and the shallowest path. Works through PEFT wrappers.
    """
    count = num_layers(model)
    named = list(model.named_modules())
    embeddings = model.get_input_embeddings()  # type: ignore[operator]
    embedding_parent = next(
        (name.rpartition(".")[0] for name, module in named if module is embeddings), None
    )
    candidates = [
        (name, module) for name, module in named
        if isinstance(module, nn.ModuleList) and len(module) == count
    ]
    if not candidates:
        raise SafesteerError(
            f"could not find the decoder layers of {type(model).__name__}: no ModuleList of "
            f"{count} blocks"
        )

    def rank(candidate: tuple[str, nn.Module]) -> tuple[bool, bool, int]:
        parent, _, leaf = candidate[0].rpartition(".")
        return parent != embedding_parent, leaf not in _LAYER_LIST_NAMES, candidate[0].count(".")

    layers: nn.ModuleList = min(candidates, key=rank)[1]  # type: ignore[assignment]
    return layers


def model_device(model: nn.Module) -> torch.device:
    """Where inputs must go: the device of the input embeddings."""
    return model.get_input_embeddings().weight.device  # type: ignore[operator]
