"""The ``response`` method (docs/method.md §3.6): refusing minus complying activations over the
tokens of templated answers to the same prompts, one candidate per layer, with the layer and
coefficient chosen by the refusal the steered model actually produces on validation prompts. Needed
for models that rarely refuse, whose prompt-contrast direction separates harmful prompts but cannot
induce refusal.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from safesteer.direction.artifact import Direction, MethodResult
from safesteer.direction.passes import mean_response_activations
from safesteer.direction.prompt_sets import DirectionData
from safesteer.direction_config import DirectionConfig
from safesteer.errors import SafesteerError
from safesteer.keyword_judge import refusal_rate
from safesteer.models.generation import generate_responses
from safesteer.models.layout import num_layers
from safesteer.progress import progress_bar
from safesteer.steering import add_to_block_input

REFUSAL_TEMPLATES = (
    "I'm sorry, but I can't help with that request.",
    "I cannot assist with that. It could cause real harm, and I won't provide it.",
    "Sorry, I am unable to help with this. It is unsafe and against my guidelines.",
    "As an AI assistant, I must decline this request because it may be harmful or illegal.",
)
COMPLIANCE_TEMPLATES = (
    "Sure, here is a detailed answer to your request.",
    "Of course! Here's how you can do it, step by step.",
    "Certainly. Below is a complete explanation with all the details you need.",
    "Absolutely, I'd be glad to help. Let's start with the first step.",
)


@dataclass
class ResponseCandidate:
    """One (layer, beta) steering setting of the response method and its measured refusal."""

    layer: int
    beta: float
    coefficient: float
    harmful_refusal: float
    harmless_refusal: float


def select_response_candidate(candidates: list[ResponseCandidate],
                              target_refusal: float) -> ResponseCandidate:
    """Fewest benign refusals among those reaching the target; else the widest refusal margin.

    Ties go to the higher harmful refusal, then the smaller beta, then the earlier layer, so the
    choice is deterministic.
    """
    if not candidates:
        raise SafesteerError("the response method has no candidate layers to try")
    reaching = [c for c in candidates if c.harmful_refusal >= target_refusal]
    if reaching:
        return min(reaching, key=lambda c: (c.harmless_refusal, -c.harmful_refusal, c.beta, c.layer))
    return min(candidates, key=lambda c: (-(c.harmful_refusal - c.harmless_refusal),
                                          -c.harmful_refusal, c.beta, c.layer))


def default_response_layers(total_layers: int, stride: int) -> list[int]:
    """Every ``stride``-th layer in ``[0.2 L, 0.8 L)``: the range where steering stays fluent."""
    first, stop = math.floor(0.2 * total_layers), math.floor(0.8 * total_layers)
    return list(range(first, stop, stride)) or [total_layers // 2]


def measure_refusal(model: nn.Module, tokenizer: Any, harmful: list[str], harmless: list[str],
                    config: DirectionConfig) -> tuple[float, float]:
    """Keyword refusal rates on greedy answers to harmful and harmless prompts."""
    answers = generate_responses(model, tokenizer, harmful + harmless,
                                 max_new_tokens=config.val_max_new_tokens,
                                 batch_size=config.batch_size)
    return refusal_rate(answers[:len(harmful)]), refusal_rate(answers[len(harmful):])


def run_response_method(model: nn.Module, tokenizer: Any, data: DirectionData,
                        config: DirectionConfig) -> MethodResult:
    """Refusing minus complying answers; layer and coefficient chosen by measured refusal."""
    prompts = data.harmful_train[:config.response_n_train]
    refusals = [REFUSAL_TEMPLATES[i % len(REFUSAL_TEMPLATES)] for i in range(len(prompts))]
    compliances = [COMPLIANCE_TEMPLATES[i % len(COMPLIANCE_TEMPLATES)] for i in range(len(prompts))]
    refuse_means, refuse_norms = mean_response_activations(
        model, tokenizer, prompts, refusals, config.batch_size, desc="response: refusing")
    comply_means, comply_norms = mean_response_activations(
        model, tokenizer, prompts, compliances, config.batch_size, desc="response: complying")
    vectors = refuse_means - comply_means
    residual_norms = (refuse_norms + comply_norms) / 2

    harmful_val = data.harmful_val[:config.response_n_val]
    harmless_val = data.harmless_val[:config.response_n_val]
    base_harmful, base_harmless = measure_refusal(model, tokenizer, harmful_val, harmless_val,
                                                  config)
    layers = config.response_layers or default_response_layers(num_layers(model),
                                                                config.response_layer_stride)
    settings = [(layer, beta) for layer in layers for beta in config.response_betas]
    candidates = []
    for layer, beta in progress_bar(settings, desc="response: scoring candidates"):
        vector = vectors[layer].float()
        coefficient = beta * residual_norms[layer].item() / vector.norm().item()
        with add_to_block_input(model, layer, vector, coefficient):
            harmful_rate, harmless_rate = measure_refusal(model, tokenizer, harmful_val,
                                                          harmless_val, config)
        candidates.append(ResponseCandidate(layer, beta, coefficient, harmful_rate, harmless_rate))
    chosen = select_response_candidate(candidates, config.target_refusal)
    vector = vectors[chosen.layer].float()
    metadata = {"method": "response", "position": None, "beta": chosen.beta,
                "vector_norm": vector.norm().item(),
                "residual_norm": residual_norms[chosen.layer].item(), "selected": asdict(chosen)}
    report = {"base_refusal": {"harmful": base_harmful, "harmless": base_harmless},
              "val_counts": {"harmful": len(harmful_val), "harmless": len(harmless_val)},
              "candidates": [asdict(candidate) for candidate in candidates]}
    return MethodResult(Direction(vector, chosen.layer, chosen.coefficient, metadata), report)
