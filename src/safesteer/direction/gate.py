"""The harmfulness gate of the conditional teacher (docs/method.md §4.2): a linear probe at the last
prompt token, its layer and threshold chosen on validation prompts.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from safesteer.direction.artifact import Gate
from safesteer.direction.numerics import difference_of_means
from safesteer.direction.passes import last_token_block_inputs
from safesteer.direction.prompt_sets import DirectionData
from safesteer.direction_config import DirectionConfig

logger = logging.getLogger(__name__)


def calibrate_threshold(harmful: torch.Tensor, harmless: torch.Tensor) -> tuple[float, float]:
    """The threshold on probe scores (``[n]`` each) with the best balanced accuracy, and that
    accuracy; of equally good thresholds, the middle of the widest gap between neighbouring scores,
    so that the choice does not hug one side's extreme."""
    values = torch.cat([harmful, harmless]).double().unique()  # sorted
    if len(values) == 1:
        return values.item(), 0.5
    middles, gaps = (values[1:] + values[:-1]) / 2, values[1:] - values[:-1]
    accuracy = ((harmful.double()[None, :] > middles[:, None]).double().mean(1)
                + (harmless.double()[None, :] <= middles[:, None]).double().mean(1)) / 2
    best = accuracy == accuracy.max()
    index = int(torch.where(best, gaps, torch.full_like(gaps, -1.0)).argmax())
    return middles[index].item(), accuracy[index].item()


def separation(harmful: torch.Tensor, harmless: torch.Tensor) -> float:
    """d': difference of the class means over their pooled standard deviation."""
    pooled = ((harmful.double().var() + harmless.double().var()) / 2).sqrt()
    return ((harmful.double().mean() - harmless.double().mean()) / (pooled + 1e-12)).item()


def fit_gate(model: nn.Module, tokenizer: Any, data: DirectionData, config: DirectionConfig,
             max_layer: int) -> Gate | None:
    """The harmfulness probe of the conditional teacher: at each layer up to ``max_layer`` (the
    steering layer; the gate must read before the steering is added), the unit difference of
    means of harmful and harmless training prompts at the last prompt token. The threshold is
    calibrated, and the layer chosen, on the validation prompts (balanced accuracy, then d').
    None when no such layer tells the two sets apart at all (the conditional teacher is then
    unavailable)."""
    activations = {}
    for role, prompts in (("harmful_train", data.harmful_train[:config.n_train]),
                          ("harmless_train", data.harmless_train[:config.n_train]),
                          ("harmful_val", data.harmful_val[:config.gate_n_val]),
                          ("harmless_val", data.harmless_val[:config.gate_n_val])):
        activations[role] = last_token_block_inputs(model, tokenizer, prompts, max_layer,
                                                    config.batch_size, desc=f"gate: {role}")
    layers = []
    for layer in range(max_layer + 1):
        vector = difference_of_means(activations["harmful_train"][:, layer],
                                     activations["harmless_train"][:, layer])
        if not vector.norm() > 0:  # e.g. the embedding of a last token every prompt shares
            continue
        unit = (vector / vector.norm()).float()
        harmful, harmless = (activations[role][:, layer] @ unit for role in ("harmful_val",
                                                                             "harmless_val"))
        threshold, accuracy = calibrate_threshold(harmful, harmless)
        layers.append({"layer": layer, "threshold": threshold, "val_balanced_accuracy": accuracy,
                       "val_separation": separation(harmful, harmless), "vector": unit})
    if not layers:
        logger.warning("no layer up to %d separates harmful from harmless prompts; the direction "
                       "gets no harmfulness gate", max_layer)
        return None
    chosen = max(layers, key=lambda row: (row["val_balanced_accuracy"], row["val_separation"]))
    metadata = {"val_balanced_accuracy": chosen["val_balanced_accuracy"],
                "val_separation": chosen["val_separation"],
                "val_counts": {"harmful": len(activations["harmful_val"]),
                               "harmless": len(activations["harmless_val"])},
                "layers": [{key: value for key, value in row.items() if key != "vector"}
                           for row in layers]}
    return Gate(chosen["vector"], chosen["layer"], chosen["threshold"], metadata)
