"""Let the model continue prompts: the generate call every ``generate``-based sampler shares, and
answers to a list of prompts, batched, as decoded text."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList

from safesteer.models.devices import seeded
from safesteer.models.kvcache import cache_keyword, generation_cache, with_room
from safesteer.models.layout import model_device
from safesteer.models.precision import generation_products
from safesteer.models.rendering import encode_rendered, render_prompts
from safesteer.progress import progress_bar


def eos_token_ids(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The EOS ids of the model's generation config and of the tokenizer (either may have none, or
    several): where a sampled answer ends."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(configured if isinstance(configured, list) else [configured])
    ids.add(tokenizer.eos_token_id)
    ids.discard(None)
    return sorted(ids)


def generate_ids(model: nn.Module, inputs: Mapping[str, Tensor], *, max_new_tokens: int,
                 pad_token_id: int | None, **options: Any) -> Tensor:
    """The ids ``model.generate`` appends to each left-padded prompt row of ``inputs`` (the
    tokenizer's output), [rows, <= max_new_tokens], with the KV cache and no gradient.

    ``options`` go to ``generate`` as given; what they leave out comes from the model's generation
    config. Seeding is the caller's (:func:`~safesteer.models.devices.seeded`): one stream may
    span several calls. The linear products run in the model's generation dtype
    (:func:`~safesteer.models.precision.generation_products`): bfloat16 products when it is
    bfloat16, else, on a CPU, the decode steps' few-row products computed as
    :class:`~safesteer.models.narrow.NarrowLinears` computes them. The KV cache (the one
    ``options`` pass, or a fresh one unless they choose a cache implementation or generation
    config) has room for the new tokens (:mod:`safesteer.models.kvcache`).
    """
    given = next((options[name] for name in ("cache", "past_key_values") if options.get(name) is not None),
                 None)
    if given is not None:
        with_room(given, max_new_tokens)  # in place: the options keep holding it
    elif not {"cache_implementation", "generation_config"} & options.keys():  # else generate's own
        fresh = generation_cache(model, max_new_tokens)
        if fresh is not None:
            options[cache_keyword(model)] = fresh
    with torch.no_grad(), generation_products(model):
        output = model.generate(**inputs, max_new_tokens=max_new_tokens,  # type: ignore[operator]
                                pad_token_id=pad_token_id, use_cache=True, **options)
    return output[:, inputs["input_ids"].shape[1]:]


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
    stop_at_chars: int | None = None,
    desc: str | None = None,
) -> list[str]:
    """Answer each prompt (greedy by default); returns decoded responses in the input order.

    Prompts are batched longest first to waste little padding and to hit any out-of-memory error on
    the first batch. Sampling is shaped by ``temperature`` and ``top_p``; top-k, which transformers
    and many generation configs turn on by default, is off. With ``seed`` it is reproducible.
    Forward hooks the caller registered on the model stay active throughout. With ``prefixes`` each
    answer starts with its prefix, and the response is what the model wrote after it. With
    ``stop_at_chars`` a row stops once its answer is that many characters long: a judge that reads
    only an answer's beginning sees the same text as after ``max_new_tokens``, for fewer steps.
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
    with progress, seeded(seed, device):
        for start in range(0, len(order), batch_size):
            indices = order[start : start + batch_size]
            batch = encode_rendered(tokenizer, [rendered[index] for index in indices], device)
            stop = ({"stopping_criteria": StoppingCriteriaList([AnswerLength(
                tokenizer, batch["input_ids"].shape[1], stop_at_chars)])} if stop_at_chars else {})
            new_tokens = generate_ids(model, batch, max_new_tokens=max_new_tokens,
                                      pad_token_id=tokenizer.pad_token_id, do_sample=do_sample,
                                      **sampling, **stop)
            texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            for index, text in zip(indices, texts, strict=True):
                responses[index] = text.strip()
            progress.update(len(indices))
    return responses


class AnswerLength(StoppingCriteria):
    """Done, for each row, once the answer after the first ``prompt_length`` ids decodes (stripped,
    as answers are returned) to at least ``chars`` characters."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_length: int, chars: int) -> None:
        self.tokenizer = tokenizer
        self.prompt_length = prompt_length
        self.chars = chars

    def __call__(self, input_ids: Tensor, scores: Tensor, **kwargs: Any) -> Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length:], skip_special_tokens=True)
        return torch.tensor([len(text.strip()) >= self.chars for text in texts], device=input_ids.device)
