"""safesteer.models (loading, layout, rendering, generation) on tiny random models; the embedded
default only under ``-m integration``."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from safesteer.config import ModelArguments
from safesteer.errors import SafesteerError
from safesteer.evaluate.check import STOP_MARGIN
from safesteer.model_source import EMBEDDED_MODELS, list_embedded_models
from safesteer.models.devices import resolve_device, resolve_dtype
from safesteer.models.generation import generate_responses
from safesteer.models.layout import decoder_layers, hidden_size, model_device, num_layers
from safesteer.models.loading import (
    _remove_stale_conversions,
    adapters_disabled,
    adapters_merged,
    load_model,
    model_id,
    pretrained_location,
)
from safesteer.models.rendering import encode_rendered, render_prompts
from safesteer.wheels import cache_dir

TINY_LAYERS = 3
_DECODER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": TINY_LAYERS,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 128,
            "max_position_embeddings": 64, "pad_token_id": 0}
# model type -> (config kwargs, dotted path of the decoder blocks)
ARCHITECTURES: dict[str, tuple[dict[str, Any], str]] = {
    "llama": (_DECODER, "model.layers"),
    "mistral": (_DECODER, "model.layers"),
    "qwen2": (_DECODER, "model.layers"),
    "qwen3": ({**_DECODER, "head_dim": 8}, "model.layers"),
    "gemma2": ({**_DECODER, "head_dim": 8}, "model.layers"),
    "gemma3_text": ({**_DECODER, "head_dim": 8}, "model.layers"),
    "phi3": (_DECODER, "model.layers"),
    "gpt2": ({"n_embd": 32, "n_layer": TINY_LAYERS, "n_head": 4, "n_positions": 64,
              "vocab_size": 128}, "transformer.h"),
    "gpt_neox": ({"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": TINY_LAYERS,
                  "num_attention_heads": 4, "vocab_size": 128}, "gpt_neox.layers"),
    # Multimodal: nested text_config, and a vision tower exactly as deep as the text decoder.
    "gemma3": ({"text_config": {**_DECODER, "head_dim": 8},
                "vision_config": {"hidden_size": 32, "intermediate_size": 64,
                                  "num_hidden_layers": TINY_LAYERS, "num_attention_heads": 4,
                                  "image_size": 28, "patch_size": 14},
                "mm_tokens_per_image": 4}, "model.language_model.layers"),
}
PROMPTS = ["Write a poem about tea.", "Hi", "Describe the park map in three easy steps, please.",
           "Plan a bicycle repair for the children before lunch today.", "Cook bread"]


def build_architecture(model_type: str) -> PreTrainedModel:
    kwargs, _ = ARCHITECTURES[model_type]
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **copy.deepcopy(kwargs))
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


@pytest.fixture
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point safesteer's cache at a temporary directory so unit tests never touch the real one."""
    root = tmp_path / "cache"
    monkeypatch.setenv("SAFESTEER_CACHE", str(root))
    return root


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_decoder_layers_resolves_for_each_architecture(model_type: str) -> None:
    model = build_architecture(model_type)
    expected = model.get_submodule(ARCHITECTURES[model_type][1])
    assert decoder_layers(model) is expected
    assert num_layers(model) == TINY_LAYERS
    assert hidden_size(model) == 32


def test_decoder_layers_through_peft(tiny_model: PreTrainedModel) -> None:
    expected = tiny_model.model.layers
    peft_model = get_peft_model(tiny_model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert decoder_layers(peft_model) is expected
    assert num_layers(peft_model) == 2
    assert hidden_size(peft_model) == 32
    assert model_device(peft_model) == torch.device("cpu")


def test_decoder_layers_missing_names_the_model_class(tiny_model: PreTrainedModel) -> None:
    tiny_model.config.num_hidden_layers = 7
    with pytest.raises(SafesteerError, match="LlamaForCausalLM"):
        decoder_layers(tiny_model)


def test_render_prompts_uses_chat_template(tiny_tokenizer: PreTrainedTokenizerBase) -> None:
    assert render_prompts(tiny_tokenizer, ["Hi"]) == [
        "<|endoftext|><|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    ]
    with_system = render_prompts(tiny_tokenizer, ["Hi", "Yo"], system_prompt="Be brief.")
    assert len(with_system) == 2
    assert with_system[1].startswith("<|endoftext|><|im_start|>system\nBe brief.<|im_end|>\n")
    assert with_system[1].endswith("<|im_start|>user\nYo<|im_end|>\n<|im_start|>assistant\n")


def test_render_prompts_without_template_says_how_to_fix(
    tiny_tokenizer: PreTrainedTokenizerBase,
) -> None:
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = None
    with pytest.raises(SafesteerError, match="--chat-template PATH"):
        render_prompts(tokenizer, ["Hi"])


def test_encode_rendered_left_pads_without_second_bos(
    tiny_tokenizer: PreTrainedTokenizerBase,
) -> None:
    rendered = render_prompts(tiny_tokenizer, ["Hi", "A much longer prompt about the park"])
    batch = encode_rendered(tiny_tokenizer, rendered, "cpu")
    short_mask = batch["attention_mask"][0]
    assert short_mask[0] == 0 and short_mask[-1] == 1
    assert bool(batch["attention_mask"][1].all())
    bos = tiny_tokenizer.bos_token_id
    for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True):
        real = ids[mask.bool()]
        assert real[0] == bos and int((real == bos).sum()) == 1
    # The hazard being avoided: plain encoding adds the tokenizer's BOS in front of the template's.
    assert tiny_tokenizer(rendered[0])["input_ids"][:2] == [bos, bos]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])
def test_generate_responses_greedy_is_deterministic_and_keeps_order(
    arch: str,
    make_tiny_model: Callable[[str], PreTrainedModel],
    tiny_tokenizer: PreTrainedTokenizerBase,
) -> None:
    model = make_tiny_model(arch)
    responses = generate_responses(model, tiny_tokenizer, PROMPTS, max_new_tokens=6, batch_size=2)
    assert len(responses) == len(PROMPTS)
    assert len(set(responses)) > 1, "prompts should lead to different continuations"
    assert generate_responses(
        model, tiny_tokenizer, PROMPTS, max_new_tokens=6, batch_size=2
    ) == responses
    reversed_responses = generate_responses(
        model, tiny_tokenizer, PROMPTS[::-1], max_new_tokens=6, batch_size=2
    )
    assert reversed_responses == responses[::-1]
    one_by_one = [
        generate_responses(model, tiny_tokenizer, [prompt], max_new_tokens=6)[0]
        for prompt in PROMPTS
    ]
    assert one_by_one == responses, "left padding must not change greedy answers"


def test_generate_responses_sampling_is_seeded_and_leaves_global_rng(
    tiny_model: PreTrainedModel, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    rng_before = torch.get_rng_state()

    def sample(seed: int) -> list[str]:
        return generate_responses(
            tiny_model, tiny_tokenizer, PROMPTS, max_new_tokens=8, do_sample=True,
            temperature=1.5, top_p=0.95, seed=seed, desc="sampling",
        )

    first = sample(1)
    assert sample(1) == first
    assert sample(2) != first
    assert torch.equal(torch.get_rng_state(), rng_before)


def test_answers_stopped_at_a_length_begin_as_the_whole_answers_do(
    tiny_model: PreTrainedModel, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    """A row stops once its answer has ``stop_at_chars`` characters; the closing check relies on
    its first ``stop_at_chars - STOP_MARGIN`` characters being the whole answer's."""
    whole = generate_responses(tiny_model, tiny_tokenizer, PROMPTS, max_new_tokens=40, batch_size=2)
    cut = generate_responses(tiny_model, tiny_tokenizer, PROMPTS, max_new_tokens=40, batch_size=2,
                             stop_at_chars=10 + STOP_MARGIN)
    assert sum(map(len, cut)) < sum(map(len, whole))  # rows stopped early
    for full, short in zip(whole, cut, strict=True):
        assert len(short) >= 10 + STOP_MARGIN or short == full
        assert full.startswith(short[:10])


def test_generate_responses_of_no_prompts_is_empty(
    tiny_model: PreTrainedModel, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    assert generate_responses(tiny_model, tiny_tokenizer, [], max_new_tokens=4) == []


def test_generate_responses_runs_caller_hooks(
    tiny_model: PreTrainedModel, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    plain = generate_responses(tiny_model, tiny_tokenizer, PROMPTS, max_new_tokens=6)
    calls = []
    push = torch.randn(hidden_size(tiny_model), generator=torch.Generator().manual_seed(3)) * 50

    def steer(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        calls.append(1)
        if args:
            return (args[0] + push, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"] + push}

    handle = decoder_layers(tiny_model)[1].register_forward_pre_hook(steer, with_kwargs=True)
    try:
        steered = generate_responses(tiny_model, tiny_tokenizer, PROMPTS, max_new_tokens=6)
    finally:
        handle.remove()
    assert calls
    assert steered != plain


def save_tiny(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: Path) -> Path:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.usefixtures("isolated_cache")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_load_model_from_directory(
    dtype: str,
    tmp_path: Path,
    tiny_model: PreTrainedModel,
    tiny_tokenizer: PreTrainedTokenizerBase,
) -> None:
    directory = save_tiny(tiny_model, tiny_tokenizer, tmp_path / "tiny")
    template = tmp_path / "template.jinja"
    template.write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}>", "utf-8")
    args = ModelArguments(model=str(directory), dtype=dtype, device="cpu",
                          chat_template=str(template))
    model, tokenizer = load_model(args)
    assert model.dtype == getattr(torch, dtype)
    assert not model.training
    assert model_device(model) == torch.device("cpu")
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token == "<|im_end|>"
    assert render_prompts(tokenizer, ["Hi"]) == ["[Hi]>"]
    assert model_id(args) == str(directory.resolve()) == model.name_or_path
    if dtype == "float32":
        inputs = encode_rendered(tokenizer, render_prompts(tiny_tokenizer, ["Hi"]), "cpu")
        with torch.no_grad():
            assert torch.equal(model(**inputs).logits, tiny_model(**inputs).logits)


@pytest.mark.usefixtures("isolated_cache")
def test_load_model_uses_eos_as_missing_pad(
    tmp_path: Path, tiny_model: PreTrainedModel, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.pad_token = None
    directory = save_tiny(tiny_model, tokenizer, tmp_path / "tiny")
    _, loaded = load_model(ModelArguments(model=str(directory), dtype="float32", device="cpu"))
    assert loaded.pad_token == loaded.eos_token == "<|im_end|>"


def test_load_model_rejects_missing_chat_template_before_loading(tmp_path: Path) -> None:
    args = ModelArguments(model=str(tmp_path), device="cpu", chat_template="missing.jinja")
    with pytest.raises(SafesteerError, match=r"missing\.jinja"):
        load_model(args)


@pytest.mark.usefixtures("isolated_cache")
def test_unknown_model_lists_embedded_names() -> None:
    assert list_embedded_models() == sorted(EMBEDDED_MODELS) and "smollm2-135m" in EMBEDDED_MODELS
    with pytest.raises(SafesteerError, match=r"unknown model 'foo'.*smollm2-135m"):
        load_model(ModelArguments(model="foo"))


@pytest.mark.usefixtures("isolated_cache")
@pytest.mark.parametrize(("variable", "value", "message"), [
    ("HF_HUB_OFFLINE", "1", "HF_HUB_OFFLINE is set"),
    ("HF_ENDPOINT", "http://127.0.0.1:9", "cannot reach the Hugging Face hub at http://127.0.0.1:9")])
def test_hub_id_without_network_fails_at_once_and_explains_alternatives(
        monkeypatch: pytest.MonkeyPatch, variable: str, value: str, message: str) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SafesteerError, match=rf"{message}.*smollm2-135m"):
        load_model(ModelArguments(model="no-such-org/no-such-model", device="cpu"))


def test_a_folder_without_a_model_says_what_a_model_folder_holds(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("no weights here")
    with pytest.raises(SafesteerError, match=r"not a model directory \(a model directory holds config\.json"):
        load_model(ModelArguments(model=str(tmp_path), device="cpu"))


@pytest.mark.usefixtures("isolated_cache")
def test_an_adapter_directory_loads_on_its_base_merged(
    tmp_path: Path, tiny_model: PreTrainedModel, tiny_tokenizer: PreTrainedTokenizerBase
) -> None:
    base = save_tiny(tiny_model, tiny_tokenizer, tmp_path / "base")
    student = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                             LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    student.save_pretrained(tmp_path / "student")
    model, _ = load_model(ModelArguments(model=str(tmp_path / "student"), device="cpu"))
    assert not hasattr(model, "peft_config") and model.name_or_path == str((tmp_path / "student").resolve())
    inputs = encode_rendered(tiny_tokenizer, render_prompts(tiny_tokenizer, ["Hi"]), "cpu")
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, student.eval()(**inputs).logits)
        assert not torch.allclose(model(**inputs).logits, tiny_model(**inputs).logits)


def test_model_id_is_stable_across_sources(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert model_id(ModelArguments(model="smollm2-135m")) == "smollm2-135m"
    assert model_id(ModelArguments(model="org/name")) == "org/name"
    assert model_id(ModelArguments(model=str(tmp_path / "." / ""))) == str(tmp_path.resolve())


def test_stale_conversion_staging_is_removed(tmp_path: Path) -> None:
    target = tmp_path / "models" / "smollm2-135m"
    stale = tmp_path / "models" / ".smollm2-135m.abc.partial"
    fresh = tmp_path / "models" / ".smollm2-135m.def.partial"
    for staging in (stale, fresh):
        staging.mkdir(parents=True)
    os.utime(stale, (0, 0))
    _remove_stale_conversions(target)
    assert not stale.exists() and fresh.exists()


def test_bad_local_paths_are_rejected(tmp_path: Path) -> None:
    stray = tmp_path / "weights.bin"
    stray.write_bytes(b"")
    with pytest.raises(SafesteerError, match=r"expected a model directory or a \.gguf file"):
        load_model(ModelArguments(model=str(stray)))
    with pytest.raises(SafesteerError, match="no such file or directory"):
        load_model(ModelArguments(model=str(tmp_path / "missing.gguf")))
    not_gguf = tmp_path / "broken.gguf"
    not_gguf.write_bytes(b"not a gguf")
    with pytest.raises(SafesteerError, match="could not load the GGUF file"):
        load_model(ModelArguments(model=str(not_gguf), device="cpu"))


def test_device_and_dtype_resolution() -> None:
    cpu = torch.device("cpu")
    assert resolve_device("cpu") == cpu
    with pytest.raises(SafesteerError, match=r"--device 'gpu0' is not a torch device"):
        resolve_device("gpu0")
    with pytest.raises(SafesteerError, match=r"--device mps: this machine has no mps device|numbered"):
        if not torch.backends.mps.is_available():
            resolve_device("mps")
        else:
            resolve_device("mps:7")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("float16", cpu) == torch.float16
    if not torch.cuda.is_available() and not torch.backends.mps.is_available():
        assert resolve_device("auto") == cpu


@pytest.mark.integration
def test_embedded_default_model_loads_and_reloads_from_cache() -> None:
    args = ModelArguments(model="smollm2-135m", dtype="float32", device="cpu")
    for _ in range(2):  # the first load may convert the GGUF; the second reads the cached copy
        model, tokenizer = load_model(args)
        converted = Path(pretrained_location("smollm2-135m"))
        assert (converted / "model.safetensors").is_file() and converted.parent == cache_dir() / "models"
        assert converted.name == f"smollm2-135m-transformers{transformers.__version__.split('.')[0]}"
        assert len(decoder_layers(model)) == num_layers(model) == 30
        assert hidden_size(model) == 576
        assert model.config.vocab_size == len(tokenizer) == 49152
        assert model.dtype == torch.float32 and model.name_or_path == "smollm2-135m"
        rendered = render_prompts(tokenizer, ["What is the capital of France?"])
        assert "<|im_start|>system" in rendered[0], "SmolLM2's template adds a default system turn"
        inputs = encode_rendered(tokenizer, rendered, model_device(model))
        with torch.no_grad():
            assert torch.isfinite(model(**inputs).logits).all()
    answer = generate_responses(model, tokenizer, ["What is the capital of France?"],
                                max_new_tokens=12)
    assert "Paris" in answer[0]


def _adapted(model: PreTrainedModel, **options: Any) -> nn.Module:
    torch.manual_seed(3)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, **options)
    return get_peft_model(model, config).eval()


def test_merged_adapters_give_the_adapters_logits_and_put_the_weights_back(
        tiny_model: PreTrainedModel) -> None:
    student = _adapted(tiny_model)
    ids = torch.tensor([[5, 9, 13, 17, 21, 25]])
    weights = {name: p.detach().clone() for name, p in student.named_parameters()}
    with torch.no_grad():
        adapted = student(ids).logits
        with student.disable_adapter():
            base = student(ids).logits
        with adapters_merged(student) as merged:
            folded = merged(ids).logits
            assert merged.base_model.model.lm_head.weight is student.base_model.model.lm_head.weight
        after = student(ids).logits
    assert not torch.allclose(adapted, base, atol=1e-3)  # the adapter matters
    torch.testing.assert_close(folded, adapted, atol=1e-5, rtol=1e-5)
    assert torch.equal(after, adapted)
    assert all(torch.equal(p, weights[name]) for name, p in student.named_parameters())


def test_adapters_disabled_is_the_base_as_peft_s_disable_adapter_and_restores_the_adapters(
        tiny_model: PreTrainedModel) -> None:
    ids = torch.tensor([[5, 9, 13, 17, 21, 25]])
    with torch.no_grad():
        plain = tiny_model(ids).logits
    student = _adapted(tiny_model)
    trainable = {name for name, p in student.named_parameters() if p.requires_grad}
    with torch.no_grad():
        adapted = student(ids).logits
        with adapters_disabled(student) as base:
            assert torch.equal(base(ids).logits, plain)
        assert torch.equal(student(ids).logits, adapted)
        assert {name for name, p in student.named_parameters() if p.requires_grad} == trainable
        with student.disable_adapter():  # adapters already off stay off, as peft's own leaves them
            with adapters_disabled(student) as base:
                assert torch.equal(base(ids).logits, plain)
            assert torch.equal(student(ids).logits, plain)
        with adapters_disabled(tiny_model) as same:
            assert same is tiny_model


@pytest.mark.parametrize("case", ["bf16 base", "dora", "adapters off", "no adapter"])
def test_adapters_that_cannot_fold_exactly_are_used_as_they_are(tiny_model: PreTrainedModel,
                                                                 case: str) -> None:
    if case == "no adapter":
        model: nn.Module = tiny_model
    else:
        model = _adapted(tiny_model.to(torch.bfloat16) if case == "bf16 base" else tiny_model,
                         use_dora=case == "dora")
    ids = torch.tensor([[5, 9, 13, 17]])
    with torch.no_grad():
        if case == "adapters off":
            with model.disable_adapter():  # type: ignore[operator]
                expected = model(ids).logits
                with adapters_merged(model) as used:
                    assert torch.equal(used(ids).logits, expected)
                assert torch.equal(model(ids).logits, expected)  # still off
            return
        expected = model(ids).logits
        data = [p.data_ptr() for p in model.parameters()]
        with adapters_merged(model) as used:
            assert torch.equal(used(ids).logits, expected)
            assert [p.data_ptr() for p in model.parameters()] == data
