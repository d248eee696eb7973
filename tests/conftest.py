"""Shared fixtures: an in-memory chat tokenizer and tiny random causal LMs, so tests never download.

The tokenizer and models are deliberately small (a few hundred tokens, 2 layers, d_model 32) so a
forward pass takes milliseconds; they behave like real chat models where it matters: ChatML
template, a BOS the tokenizer adds on plain encoding, ``<|im_end|>`` as EOS and pad, left padding.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

BOS = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
CHATML_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TINY_ARCHITECTURES = ("llama", "qwen2", "gemma2")

_SUBJECTS = ["the cat", "a gardener", "my neighbour", "the teacher", "a small robot", "our team"]
_VERBS = ["writes", "paints", "explains", "cooks", "plans", "repairs", "describes", "finds"]
_OBJECTS = ["a poem", "the fence", "a recipe for bread", "the weekly schedule", "a bicycle",
            "a map of the park", "an email to a friend", "the history of tea"]
_ENDINGS = ["today.", "before lunch.", "with great care!", "quickly?", "for the children.",
            "in 3 easy steps:", "(again), said Ann; yes."]


def _training_text() -> list[str]:
    """A few hundred harmless synthetic sentences covering letters, digits and punctuation."""
    return [" ".join(parts) for parts in itertools.product(_SUBJECTS, _VERBS, _OBJECTS, _ENDINGS)]


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE chat tokenizer (encodes any text). Shared: deepcopy it before mutating."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=[BOS, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_training_text(), trainer=trainer)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, backend.token_to_id(BOS))]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=IM_END,
        pad_token=IM_END,
        additional_special_tokens=[IM_START],
        padding_side="left",
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def build_tiny_model(arch: str, tokenizer: PreTrainedTokenizerFast) -> PreTrainedModel:
    """A fresh seeded float32 model of transformers model type ``arch``, in eval mode."""
    config = AutoConfig.for_model(
        arch,
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


@pytest.fixture
def make_tiny_model(tiny_tokenizer: PreTrainedTokenizerFast) -> Callable[[str], PreTrainedModel]:
    """Factory: ``make_tiny_model(arch)`` builds a fresh seeded float32 model in eval mode.

    ``arch`` is a transformers model type; ``TINY_ARCHITECTURES`` are the ones known to work here.
    """
    return lambda arch: build_tiny_model(arch, tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_tokenizer: PreTrainedTokenizerFast, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default tiny model saved as a model directory (``--model DIR``); shared, so read it only."""
    path = tmp_path_factory.mktemp("tiny-model")
    build_tiny_model("llama", tiny_tokenizer).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def tiny_model(make_tiny_model: Callable[[str], PreTrainedModel]) -> PreTrainedModel:
    """The default tiny model: a 2-layer Llama."""
    return make_tiny_model("llama")


@pytest.fixture(autouse=True)
def _one_thread_for_tiny_models(request: pytest.FixtureRequest) -> Iterator[None]:
    """Tiny models run fastest on one thread (intra-op threads only contend); the real model in
    integration tests keeps every core."""
    if request.node.get_closest_marker("integration"):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def record_bfloat_products(monkeypatch: pytest.MonkeyPatch) -> Callable[[object], list]:
    """Swaps a module's ``BfloatProducts`` for a subclass that records every mode made; returns
    the list they go into."""
    from safesteer.models.precision import BfloatProducts

    def record(module: object) -> list[BfloatProducts]:
        modes: list[BfloatProducts] = []

        class Recorded(BfloatProducts):
            def __init__(self) -> None:
                super().__init__()
                modes.append(self)

        monkeypatch.setattr(module, "BfloatProducts", Recorded)
        return modes
    return record


@pytest.fixture
def fake_benchmarks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Synthetic benchmark data in place of the pinned wheels: every registry prompt set is five
    benign prompts (``safesteer-train`` the first of them; local files are read for real), MMLU,
    GSM8K and HumanEval a few made-up items, and the harmbench-test prompts have two categories."""
    from safesteer.config import DataArguments
    from safesteer.evaluate import benchmarks, harness
    from safesteer.gold import GSM8KProblem, HumanEvalProblem, MultipleChoiceQuestion

    prompts = ["Describe cats.", "Explain how rivers form, quickly please.",
               "Write about mountains and snow.", "List three colours of autumn leaves.",
               "Summarise the history of ancient Rome."]
    real_load = DataArguments.load
    monkeypatch.setattr(DataArguments, "load", lambda self, name, limit=None: (
        real_load(self, name, limit) if Path(name).is_file()
        else prompts[:1] if name == "safesteer-train" else prompts))
    monkeypatch.setattr(benchmarks, "prompt_categories", lambda name: {
        prompt.strip(): "animals" if "cats" in prompt else "places" for prompt in prompts}
        if name == "harmbench-test" else {})
    monkeypatch.setattr(harness, "load_mmlu", lambda subset, limit, seed: [
        MultipleChoiceQuestion(f"Question {i}?", ("one", "two", "three", "four"), i % 4, "anatomy")
        for i in range(4)])
    problems = [GSM8KProblem(f"What is {i} plus 1?", str(i + 1), f"{i} plus 1 is {i + 1}. The answer is "
                             f"{i + 1}.") for i in range(3)]
    monkeypatch.setattr(benchmarks, "load_gsm8k", lambda limit: problems)
    monkeypatch.setattr(benchmarks, "load_humaneval", lambda limit: [
        HumanEvalProblem("t/0", "def f():\n", "    return 1\n", "def check(c):\n    assert c() == 1\n", "f")])
