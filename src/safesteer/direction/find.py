"""Stage 1 as a whole: run the configured method (``auto``: ``prompt``, then ``response`` when no
prompt candidate survives; docs/method.md §3.6), fit the gate and record how the direction was found.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any

from torch import nn

from safesteer import __version__
from safesteer.config import DataArguments
from safesteer.direction.artifact import Direction, MethodResult
from safesteer.direction.gate import fit_gate
from safesteer.direction.prompt_method import run_prompt_method
from safesteer.direction.prompt_sets import DirectionData
from safesteer.direction.response_method import run_response_method
from safesteer.direction_config import DirectionConfig
from safesteer.errors import SafesteerError
from safesteer.models.layout import hidden_size, num_layers
from safesteer.models.precision import generation_dtype_name
from safesteer.validation import check_layers

logger = logging.getLogger(__name__)


def find_direction(model: nn.Module, tokenizer: Any, config: DirectionConfig,
                   data: DataArguments, model_name: str) -> Direction:
    """Run the configured method (``auto``: prompt, then response if nothing survives)."""
    check_layers("response_layers", config.response_layers, num_layers(model))
    prompt_sets = DirectionData.load(config, data)
    reports: dict[str, Any] = {}
    result: MethodResult | None = None
    if config.method in ("auto", "prompt"):
        result = run_prompt_method(model, tokenizer, prompt_sets, config)
        reports["prompt"] = result.report
        if result.direction is None:
            counts = _status_counts(result.report["candidates"])
            reason = f"no prompt-method candidate passed the filters ({counts})"
            if config.method == "prompt":
                raise SafesteerError(f"{reason}; try --method response")
            logger.info("%s; falling back to the response method", reason)
        else:
            reason = "a prompt-method candidate passed every filter"
    if result is None or result.direction is None:
        if config.method == "response":
            reason = "response method requested"
        result = run_response_method(model, tokenizer, prompt_sets, config)
        reports["response"] = result.report
    direction = result.direction
    assert direction is not None
    gate_sets = prompt_sets.for_gate(config, data)
    direction.gate = fit_gate(model, tokenizer, gate_sets, config, direction.layer)
    if direction.gate is not None:
        direction.gate.metadata["data"] = gate_sets.summary()
    direction.metadata.update({
        "selection_reason": reason,
        "model": model_name,
        "hidden_size": hidden_size(model),
        "num_layers": num_layers(model),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "generation_dtype": generation_dtype_name(model),
        "data_seed": data.data_seed,
        "config": asdict(config),
        "data": prompt_sets.summary(),
        "reports": reports,
        "safesteer_version": __version__,
    })
    return direction


def _status_counts(candidates: list[dict[str, Any]]) -> str:
    counts: dict[str, int] = {}
    for candidate in candidates:
        counts[candidate["status"]] = counts.get(candidate["status"], 0) + 1
    return ", ".join(f"{status}: {count}" for status, count in sorted(counts.items()))
