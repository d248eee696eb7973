"""The model under study, of any architecture: decoder layers are found from the config's layer
count, prompts go through the tokenizer's own chat template, and nothing switches on a model family.

The package in reading order: ``devices`` (``--device``/``--dtype``, seeded device RNG),
``loading`` (embedded, directory, GGUF, hub id, adapter on its base), ``layout`` (decoder blocks and
sizes), ``rendering`` (chat template, left padding, positions), ``linears`` (products computed
another way: a mode, or routed through a model's linear layers), ``narrow`` (few-row products on a
CPU), ``precision`` (bfloat16 products while generating), ``kvcache`` (the generate call's KV
cache, with room for the new tokens), ``generation`` (the shared generate call, batched
answers). The names below are the public ones; code inside safesteer imports from the module
that defines each.
"""

from safesteer.models.devices import resolve_device, resolve_dtype, seeded
from safesteer.models.generation import generate_ids, generate_responses
from safesteer.models.layout import context_length, decoder_layers, hidden_size, model_device, num_layers
from safesteer.models.loading import (
    adapters_disabled,
    check_model_arguments,
    load_adapter,
    load_model,
    model_id,
    pretrained_location,
)
from safesteer.models.rendering import encode_rendered, position_ids, render_prompts

__all__ = [
    "adapters_disabled",
    "check_model_arguments",
    "context_length",
    "decoder_layers",
    "encode_rendered",
    "generate_ids",
    "generate_responses",
    "hidden_size",
    "load_adapter",
    "load_model",
    "model_device",
    "model_id",
    "num_layers",
    "position_ids",
    "pretrained_location",
    "render_prompts",
    "resolve_device",
    "resolve_dtype",
    "seeded",
]
