"""Stage 1's artifact: the refusal direction, where and how strongly to add it, and the harmfulness
gate of the conditional teacher (docs/method.md §2, §4.1–4.2), saved as ``direction.json`` and
``direction.safetensors``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from safesteer.errors import SafesteerError
from safesteer.io import atomic_write, read_json, write_json
from safesteer.models.layout import hidden_size, num_layers
from safesteer.steering import (
    add_to_block_input,
    block_input_at_last_position,
    gated_add_to_block_input,
    probe_rows,
)

# What save writes and load reads in a run directory: the record, and the vectors it describes.
DIRECTION_FILES = ("direction.json", "direction.safetensors")


@dataclass
class Gate:
    """A harmfulness probe: block ``layer``'s input at the last prompt token, projected on the unit
    ``vector``; a prompt scoring above ``threshold`` is treated as harmful.

    It makes the conditional teacher, which steers harmful prompts only. On models that rarely
    refuse, the prompt-contrast direction cannot induce refusal but still separates harmful from
    harmless prompts, so it serves as the probe while another direction does the steering.
    """

    vector: torch.Tensor
    layer: int
    threshold: float
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class Direction:
    """A steering vector with where and how strongly to add it; the teacher is base + this.

    ``gate``, when present, lets the teacher be conditional: steered only on prompts it flags.
    """

    vector: torch.Tensor
    layer: int
    coefficient: float
    metadata: dict[str, Any] = field(default_factory=dict)
    gate: Gate | None = None

    def check_compatible(self, model: nn.Module) -> None:
        """Refuse a direction extracted from a model of another width or depth."""
        width, depth = hidden_size(model), num_layers(model)
        expected_depth = self.metadata.get("num_layers", depth)
        if self.vector.shape[-1] != width or expected_depth != depth:
            raise SafesteerError(
                f"direction was extracted from a model with hidden size {self.vector.shape[-1]} and "
                f"{expected_depth} layers (model {self.metadata.get('model', '?')}); this model has "
                f"hidden size {width} and {depth} layers"
            )

    @contextmanager
    def steer(self, model: nn.Module, rows: torch.Tensor | None = None,
              gated: bool = False) -> Iterator[None]:
        """The safety teacher: ``model`` with ``coefficient * vector`` added at ``layer``.

        ``rows`` (bool ``[batch]``) steers only those rows of every forward in the block, for
        teacher-forced passes whose gate was read from the prompt (:meth:`gate_rows`). ``gated``
        lets the gate decide at each prefill instead: the conditional teacher for generation.
        """
        self.check_compatible(model)
        if gated:
            gate = self.require_gate()
            with gated_add_to_block_input(model, self.layer, self.vector, self.coefficient,
                                          gate.layer, gate.vector, gate.threshold):
                yield
            return
        vector = self.vector
        if rows is not None:
            vector = rows.to(device=vector.device, dtype=vector.dtype)[:, None] * vector
        with add_to_block_input(model, self.layer, vector, self.coefficient):
            yield

    def require_gate(self) -> Gate:
        if self.gate is None:
            raise SafesteerError("this direction has no harmfulness gate, which the conditional teacher "
                                 "needs; re-run stage 1 (`safesteer direction` or `safesteer run "
                                 "--overwrite`) with this version of safesteer")
        return self.gate

    def gate_rows(self, model: nn.Module, input_ids: torch.Tensor,
                  attention_mask: torch.Tensor) -> torch.Tensor:
        """Which prompts of a left-padded, unsteered prompt batch the gate flags (bool ``[batch]``)."""
        gate = self.require_gate()
        hidden = block_input_at_last_position(model, gate.layer, input_ids, attention_mask)
        return probe_rows(hidden, gate.vector, gate.threshold)

    def save(self, output_dir: Path) -> None:
        tensors = {"direction": self.vector.detach().float().contiguous().cpu()}
        record = {**self.metadata, "layer": self.layer, "coefficient": self.coefficient}
        if self.gate is not None:
            tensors["gate"] = self.gate.vector.detach().float().contiguous().cpu()
            record["gate"] = {**self.gate.metadata, "layer": self.gate.layer,
                              "threshold": self.gate.threshold}
        meta_path, tensor_path = (output_dir / name for name in DIRECTION_FILES)
        atomic_write(tensor_path,
                     lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
        write_json(meta_path, record)

    @classmethod
    def load(cls, path: str | Path) -> Direction:
        """Load from a run directory or from its ``direction.json`` / ``.safetensors`` file."""
        path = Path(path)
        if not path.exists():
            raise SafesteerError(f"{path} does not exist; give a run directory or its direction.json")
        folder = path if path.is_dir() else path.parent
        meta_path, tensor_path = (folder / name for name in DIRECTION_FILES)
        if not meta_path.is_file() or not tensor_path.is_file():
            raise SafesteerError(f"{folder} holds no direction (direction.json + "
                                 "direction.safetensors); run `safesteer direction` first")
        metadata = read_json(meta_path)
        try:
            layer, coefficient = int(metadata["layer"]), float(metadata["coefficient"])
            gate_record = metadata.pop("gate", None)
            gate_place = None if gate_record is None else (int(gate_record.pop("layer")),
                                                           float(gate_record.pop("threshold")))
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise SafesteerError(f"{meta_path}: expected an object with numeric 'layer' and "
                                 "'coefficient' (and, when present, a 'gate' object with numeric "
                                 "'layer' and 'threshold')") from error
        try:
            tensors = load_file(str(tensor_path))
            vector = tensors["direction"]
            gate_vector = tensors["gate"] if gate_place is not None else None
        except Exception as error:  # safetensors raises its own error types for damaged files
            raise SafesteerError(f"{tensor_path}: not a safetensors file with a 'direction' tensor "
                                 f"(and a 'gate' tensor when direction.json has a gate) ({error})") from error
        gate = None
        if gate_place is not None and gate_vector is not None:
            gate = Gate(gate_vector, gate_place[0], gate_place[1], gate_record)
        return cls(vector, layer, coefficient, metadata, gate)


@dataclass
class MethodResult:
    """What one extraction method found: a direction or None, and the evidence either way."""

    direction: Direction | None
    report: dict[str, Any]
