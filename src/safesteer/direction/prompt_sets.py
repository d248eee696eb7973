"""The four prompt sets of stage 1 (docs/method.md §3.1), read once and shared by both methods and
the gate, with the record of where each came from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from safesteer.config import DataArguments
from safesteer.data.splits import prompts_sha256
from safesteer.direction_config import DirectionConfig


@dataclass
class DirectionData:
    """The four prompt sets of stage 1, with what is needed to record where they came from."""

    harmful_train: list[str]
    harmless_train: list[str]
    harmful_val: list[str]
    harmless_val: list[str]
    sources: dict[str, str]

    @classmethod
    def load(cls, config: DirectionConfig, data: DataArguments) -> DirectionData:
        def get(name: str, limit: int) -> list[str]:
            return data.load(name, limit)

        n_train = max(config.n_train, config.response_n_train)
        n_val = max(config.n_val, config.response_n_val, config.gate_n_val)
        return cls(get(config.harmful_train, n_train), get(config.harmless_train, n_train),
                   get(config.harmful_val, n_val), get(config.harmless_val, n_val),
                   {"harmful_train": config.harmful_train, "harmless_train": config.harmless_train,
                    "harmful_val": config.harmful_val, "harmless_val": config.harmless_val})

    def for_gate(self, config: DirectionConfig, data: DataArguments) -> DirectionData:
        """The sets the harmfulness gate is fitted and calibrated on: these, except where a
        ``--gate-*`` option names others."""
        chosen = {role: getattr(config, f"gate_{role}") for role in self.sources}
        sets = {role: data.load(name, config.n_train if role.endswith("train") else config.gate_n_val)
                if name else getattr(self, role) for role, name in chosen.items()}
        return DirectionData(**sets, sources={role: name or self.sources[role]
                                              for role, name in chosen.items()})

    def summary(self) -> dict[str, dict[str, Any]]:
        return {role: {"source": self.sources[role], "count": len(getattr(self, role)),
                       "sha256": prompts_sha256(getattr(self, role))} for role in self.sources}
