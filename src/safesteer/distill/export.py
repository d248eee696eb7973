"""``safesteer export``: a trained LoRA student merged into its base weights as a plain model."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from safesteer.errors import SafesteerError
from safesteer.io import EXPORT_KIND, check_apart, check_output_dir, claim_output_dir, publish_dir
from safesteer.models.loading import merged_adapter


def merge_student(base: PreTrainedModel | str | Path, adapter_dir: str | Path, output_dir: str | Path,
                  *, dtype: torch.dtype = torch.float32) -> Path:
    """Merge a saved LoRA student into its base weights and save a plain model directory.

    ``base`` is the loaded base model (modified in place: cast to ``dtype`` and merged) or its
    directory. Merging in float32 (the default) keeps updates smaller than a bf16 ulp of the base
    weights (docs/method.md §9.8); pass torch.bfloat16 for a half-size file at that cost. The tokenizer saved
    beside the adapter is copied, so the result loads with plain AutoModelForCausalLM/AutoTokenizer.
    An existing ``output_dir`` is replaced only when it is an earlier export (its ``safesteer.json``
    says so) or empty: never the run, nor a folder of the user's.
    """
    adapter_dir, output_dir = Path(adapter_dir), Path(output_dir)
    check_apart(output_dir, adapter_dir, "adapter directory")
    check_output_dir(output_dir, EXPORT_KIND, overwrite=True)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise SafesteerError(f"{adapter_dir} holds no LoRA adapter (adapter_config.json); a full "
                             "fine-tune's student directory is already a plain model")
    if isinstance(base, str | Path):
        base = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    merged = merged_adapter(base.to(dtype), adapter_dir)
    staging = output_dir.parent / f".{output_dir.name}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    merged.save_pretrained(staging)
    if (adapter_dir / "tokenizer_config.json").is_file():
        AutoTokenizer.from_pretrained(adapter_dir).save_pretrained(staging)
    claim_output_dir(staging, EXPORT_KIND)
    return publish_dir(staging, output_dir, EXPORT_KIND)
