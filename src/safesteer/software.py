"""The software a result was made with, beside its settings: the Python, safesteer and library
releases and torch's thread count of the process that wrote ``results.json`` (per target) or
``check.json`` (not numpy's or tokenizers' releases, nor the device).

Answers and scores move with them: another transformers release may compute attention another
way, and a product summed over another split of threads rounds otherwise, so results that differ
here are not expected to agree bit for bit (a greedy answer may part after a few tokens).
"""

from __future__ import annotations

import importlib.metadata
import platform

import torch

from safesteer import __version__

LIBRARIES = ("torch", "transformers", "peft", "accelerate")


def software() -> dict[str, str | int]:
    """This process's Python, safesteer and library releases and torch's intra-op thread count."""
    record: dict[str, str | int] = {"python": platform.python_version(), "safesteer": __version__}
    record.update({name: importlib.metadata.version(name) for name in LIBRARIES})
    record["torch_threads"] = torch.get_num_threads()
    return record
