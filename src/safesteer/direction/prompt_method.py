"""The ``prompt`` method (Arditi et al. 2024; docs/method.md §3.2–3.5): harmful minus harmless
activations at the post-instruction positions, one candidate per (position, layer), selected by
refusal score with the KL, induce and layer-pruning filters and the lowest bypass score.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from safesteer.direction.artifact import Direction, MethodResult
from safesteer.direction.numerics import (
    difference_of_means,
    kl_divergence,
    refusal_score,
    refusal_token_ids,
)
from safesteer.direction.passes import last_position_logits, post_instruction_length, post_instruction_pass
from safesteer.direction.prompt_sets import DirectionData
from safesteer.direction_config import DirectionConfig
from safesteer.models.layout import num_layers
from safesteer.progress import progress_bar
from safesteer.steering import ablate_direction, add_to_block_input

logger = logging.getLogger(__name__)


@dataclass
class PromptCandidate:
    """Scores of one (position, layer) candidate of the prompt method; None = not computed."""

    position: int
    layer: int
    induce: float | None = None
    kl: float | None = None
    bypass: float | None = None
    status: str = "pending"
    screened: bool = False


def prompt_candidate_status(candidate: PromptCandidate, total_layers: int,
                            kl_threshold: float, prune_fraction: float) -> str:
    """Why a candidate is discarded (Arditi's filters), or ``ok``; cheapest reasons first."""
    if candidate.layer >= math.floor((1 - prune_fraction) * total_layers):
        return "pruned-layer"
    scores = (candidate.induce, candidate.kl, candidate.bypass)
    if any(score is not None and math.isnan(score) for score in scores):
        return "nan"
    if candidate.induce is not None and candidate.induce < 0:
        return "induce<0"
    if candidate.kl is not None and candidate.kl > kl_threshold:
        return "kl>threshold"
    return "ok" if None not in scores else "pending"


def select_prompt_candidate(candidates: list[PromptCandidate]) -> PromptCandidate | None:
    """Lowest bypass score among surviving candidates; ties go to the earlier layer/position."""
    survivors = [candidate for candidate in candidates if candidate.status == "ok"]
    if not survivors:
        return None
    return min(survivors, key=lambda c: (c.bypass, c.layer, c.position))


def filter_by_refusal(prompts: list[Any], scores: torch.Tensor, refused: bool,
                      minimum: int) -> tuple[list[Any], bool]:
    """Keep prompts the model refuses (``refused``) or answers; all of them if fewer than
    ``minimum`` would remain. Returns the prompts and whether the filter was applied."""
    keep = [prompt for prompt, score in zip(prompts, scores.tolist(), strict=True)
            if (score > 0) == refused]
    if len(keep) < minimum:
        return prompts, False
    return keep, True


def run_prompt_method(model: nn.Module, tokenizer: Any, data: DirectionData,
                      config: DirectionConfig) -> MethodResult:
    """Arditi's difference of means over post-instruction positions, with full selection."""
    refusal_ids = refusal_token_ids(tokenizer)
    positions = post_instruction_length(tokenizer)
    total_layers = num_layers(model)
    sets = {"harmful_train": (data.harmful_train[:config.n_train], True),
            "harmless_train": (data.harmless_train[:config.n_train], False),
            "harmful_val": (data.harmful_val[:config.n_val], True),
            "harmless_val": (data.harmless_val[:config.n_val], False)}
    kept: dict[str, list[int]] = {}
    filtered: dict[str, bool] = {}
    train_activations: dict[str, torch.Tensor] = {}
    for role, (prompts, refused) in sets.items():
        if role.endswith("train"):
            train_activations[role], scores = post_instruction_pass(
                model, tokenizer, prompts, positions, refusal_ids, config.batch_size,
                desc=f"prompt: {role} activations")
        elif config.filter_by_score:
            scores = refusal_score(last_position_logits(model, tokenizer, prompts, config.batch_size),
                                   refusal_ids)
        indices = list(range(len(prompts)))
        kept[role], filtered[role] = indices, False
        if config.filter_by_score:
            kept[role], filtered[role] = filter_by_refusal(indices, scores, refused, minimum=4)
            if not filtered[role]:
                logger.warning("refusal-score filter would leave fewer than 4 %s prompts; "
                               "using all %d unfiltered", role, len(prompts))
    harmful_val = [sets["harmful_val"][0][i] for i in kept["harmful_val"]]
    harmless_val = [sets["harmless_val"][0][i] for i in kept["harmless_val"]]
    candidates_by_pos = difference_of_means(train_activations["harmful_train"][kept["harmful_train"]],
                                            train_activations["harmless_train"][kept["harmless_train"]])
    base_harmless = last_position_logits(model, tokenizer, harmless_val, config.batch_size)
    screen = harmless_val[:config.induce_screen_prompts]
    if len(screen) == len(harmless_val):
        screen = []
    candidates = [PromptCandidate(position=pos - positions, layer=layer)
                  for pos in range(positions) for layer in range(total_layers)]

    def status(candidate: PromptCandidate) -> str:
        return prompt_candidate_status(candidate, total_layers, config.kl_threshold,
                                       config.prune_layer_fraction)

    for candidate in progress_bar(candidates, desc="prompt: scoring candidates"):
        candidate.status = status(candidate)
        if candidate.status != "pending":
            continue
        vector = candidates_by_pos[candidate.position + positions, candidate.layer].float()
        with add_to_block_input(model, candidate.layer, vector):
            if screen:
                steered = last_position_logits(model, tokenizer, screen, config.batch_size)
                candidate.induce = refusal_score(steered, refusal_ids).mean().item()
                candidate.screened = candidate.induce < -config.induce_screen_margin
            if not candidate.screened:
                steered = last_position_logits(model, tokenizer, harmless_val, config.batch_size)
                candidate.induce = refusal_score(steered, refusal_ids).mean().item()
        candidate.status = status(candidate)
        if candidate.status != "pending":
            continue
        with ablate_direction(model, vector):
            ablated_harmless = last_position_logits(model, tokenizer, harmless_val,
                                                    config.batch_size)
            ablated_harmful = last_position_logits(model, tokenizer, harmful_val,
                                                   config.batch_size)
        candidate.kl = kl_divergence(base_harmless, ablated_harmless).mean().item()
        candidate.bypass = refusal_score(ablated_harmful, refusal_ids).mean().item()
        candidate.status = status(candidate)

    chosen = select_prompt_candidate(candidates)
    report = {
        "refusal_token_ids": refusal_ids,
        "refusal_tokens": tokenizer.convert_ids_to_tokens(refusal_ids),
        "post_instruction_positions": positions,
        "filter_applied": filtered,
        "filtered_counts": {role: len(indices) for role, indices in kept.items()},
        "screened_candidates": sum(candidate.screened for candidate in candidates),
        "candidates": [asdict(candidate) for candidate in candidates],
    }
    if chosen is None:
        return MethodResult(None, report)
    vector = candidates_by_pos[chosen.position + positions, chosen.layer].float()
    metadata = {"method": "prompt", "position": chosen.position, "beta": None,
                "vector_norm": vector.norm().item(), "selected": asdict(chosen)}
    return MethodResult(Direction(vector, chosen.layer, 1.0, metadata), report)
