"""Stage 1: find a refusal direction and the steering that turns the base model into a teacher.

Two extraction methods, both difference of means (docs/method.md §3): ``prompt`` contrasts harmful
and harmless prompts (``prompt_method``), ``response`` refusing and complying answers
(``response_method``); ``auto`` tries ``prompt`` and falls back to ``response`` when no prompt
candidate survives (``find``). The package in reading order: ``artifact`` (``Direction`` and its
``Gate``), ``numerics``, ``passes`` (model passes), ``prompt_sets``, ``gate``, the two methods,
``find``. The names below are the public ones; code inside safesteer imports from the module that
defines each.
"""

from safesteer.direction.artifact import Direction, Gate, MethodResult
from safesteer.direction.find import find_direction
from safesteer.direction.gate import fit_gate
from safesteer.direction.passes import mean_response_activations
from safesteer.direction.prompt_method import run_prompt_method
from safesteer.direction.prompt_sets import DirectionData
from safesteer.direction.response_method import (
    COMPLIANCE_TEMPLATES,
    REFUSAL_TEMPLATES,
    run_response_method,
)

__all__ = [
    "COMPLIANCE_TEMPLATES",
    "REFUSAL_TEMPLATES",
    "Direction",
    "DirectionData",
    "Gate",
    "MethodResult",
    "find_direction",
    "fit_gate",
    "mean_response_activations",
    "run_prompt_method",
    "run_response_method",
]
