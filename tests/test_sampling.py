"""The three sampling paths, pinned token for token on a fixed seed, so that refactoring them (the
shared generate call of safesteer.models.generation) cannot change what any of them draws.

The paths stay three because they need different things: ``generate_responses`` answers as text
(greedy by default) under the model's own generation config; ``sample_completions`` draws the
distillation step's ids with only temperature and top-p, stopping at any EOS; ``sample_rollouts``
draws exactly H − 1 tokens per row with end-of-turn ids blocked, from a CPU generator so that the
vote depends on the seed and not on the device's RNG. The pins below were captured before the
shared part was factored out; they hold for a given torch and transformers release, and a change of
either may redraw them (then re-capture, after checking the paths against each other by hand).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from safesteer.distill import rollout
from safesteer.distill.config import DistillConfig
from safesteer.distill.rollout import sample_completions
from safesteer.models.generation import generate_responses
from safesteer.models.layout import model_device
from safesteer.models.precision import BfloatProducts
from safesteer.models.rendering import encode_rendered, render_prompts
from safesteer.scoring import read_prompts
from safesteer.tokens.rollouts import sample_rollouts

PROMPTS = ["Tell me a story about a cat.", "What is two plus two?", "Name a colour."]


def _encoded(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> dict[str, torch.Tensor]:
    return dict(encode_rendered(tokenizer, render_prompts(tokenizer, PROMPTS), model_device(model)))


def test_generate_responses_draws_the_pinned_answers(tiny_model: PreTrainedModel,
                                                     tiny_tokenizer: PreTrainedTokenizerBase) -> None:
    greedy = generate_responses(tiny_model, tiny_tokenizer, PROMPTS, max_new_tokens=6, batch_size=2)
    sampled = generate_responses(tiny_model, tiny_tokenizer, PROMPTS, max_new_tokens=6, batch_size=2,
                                 do_sample=True, temperature=0.8, top_p=0.9, seed=7)
    assert (greedy, sampled) == (GREEDY, SAMPLED)


def test_sample_completions_draws_the_pinned_ids(tiny_model: PreTrainedModel,
                                                 tiny_tokenizer: PreTrainedTokenizerBase) -> None:
    encoded = _encoded(tiny_tokenizer, tiny_model)
    config = DistillConfig(max_new_tokens=6, temperature=0.9, top_p=0.95)
    ids = sample_completions(tiny_model, encoded["input_ids"], encoded["attention_mask"], config=config,
                             eos_token_ids=[tiny_tokenizer.eos_token_id],
                             pad_token_id=tiny_tokenizer.pad_token_id, seed=3, step=1)
    assert ids.tolist() == COMPLETIONS


def test_samples_of_a_prompt_read_it_once_and_draw_what_repeated_prompts_draw(
        tiny_model: PreTrainedModel, tiny_tokenizer: PreTrainedTokenizerBase) -> None:
    encoded = _encoded(tiny_tokenizer, tiny_model)
    config = DistillConfig(max_new_tokens=6, temperature=0.9, top_p=0.95)
    options = {"config": config, "eos_token_ids": [tiny_tokenizer.eos_token_id],
               "pad_token_id": tiny_tokenizer.pad_token_id, "seed": 3, "step": 1}
    shared = sample_completions(tiny_model, encoded["input_ids"], encoded["attention_mask"], samples=2,
                                **options)
    repeated = sample_completions(tiny_model, encoded["input_ids"].repeat_interleave(2, 0),
                                  encoded["attention_mask"].repeat_interleave(2, 0), **options)
    assert shared.shape == (2 * len(encoded["input_ids"]), 6)
    assert shared.tolist() == repeated.tolist()


def test_a_shared_prompt_is_read_in_the_weights_own_products(
        tiny_model: PreTrainedModel, tiny_tokenizer: PreTrainedTokenizerBase,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Even when generation then goes on in bfloat16 products (--generation-dtype): the demo's
    # results were chosen and recorded with the prompt read so (docs/method.md §6.1).
    monkeypatch.setattr(tiny_model, "safesteer_generation_dtype", torch.bfloat16, raising=False)
    reads: list[tuple[tuple[Any, ...], torch.Tensor]] = []

    def reading(*args: Any) -> tuple[torch.Tensor, Any]:
        first, cache = read_prompts(*args)
        reads.append((args, first))
        return first, cache

    monkeypatch.setattr(rollout, "read_prompts", reading)
    encoded = _encoded(tiny_tokenizer, tiny_model)
    sample_completions(tiny_model, encoded["input_ids"], encoded["attention_mask"], samples=2,
                       config=DistillConfig(max_new_tokens=2), eos_token_ids=[tiny_tokenizer.eos_token_id],
                       pad_token_id=tiny_tokenizer.pad_token_id, seed=3, step=1)
    [(args, shared)] = reads
    with torch.no_grad():
        in_float32 = read_prompts(*args)[0]
        with BfloatProducts():
            in_bfloat16 = read_prompts(*args)[0]
    assert torch.equal(shared, in_float32) and not torch.equal(shared, in_bfloat16)


def test_sample_rollouts_draws_the_pinned_ids(tiny_model: PreTrainedModel,
                                              tiny_tokenizer: PreTrainedTokenizerBase) -> None:
    ids = sample_rollouts(tiny_model, _encoded(tiny_tokenizer, tiny_model), 5, temperature=1.0, top_p=0.9,
                          blocked_ids=[tiny_tokenizer.eos_token_id],
                          generator=torch.Generator().manual_seed(5))
    assert ids.tolist() == ROLLOUTS



# Captured before the refactoring: torch 2.13 (CPU, one thread), transformers 5.24, the tiny Llama of
# conftest.
GREEDY = ["'den\ufffd\ufffd\ufffd\ufffd"] * 3
SAMPLED = ["emeedayW\ufffd", "forr\ufffd\ufffd8\ufffd", "\ufffd wit\ufffdre before\ufffd"]
COMPLETIONS = [[246, 5, 16, 193, 214, 395], [74, 104, 151, 78, 318, 275], [270, 240, 162, 324, 7, 339]]
ROLLOUTS = [[78, 251, 346, 254, 185], [293, 271, 226, 348, 388], [98, 4, 229, 180, 273]]
