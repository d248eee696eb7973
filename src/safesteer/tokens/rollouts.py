"""The steered rollouts of docs/method.md §5 steps 1–2: each vote prompt continued by H−1 tokens
sampled from the teacher with a seeded CPU generator, kept as token ids for teacher-forced scoring.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from safesteer.models.kvcache import cache_keyword
from safesteer.models.layout import model_device
from safesteer.models.rendering import encode_rendered, position_ids, render_prompts
from safesteer.progress import progress_bar
from safesteer.tokens_config import TokensConfig

if TYPE_CHECKING:
    from safesteer.direction.artifact import Direction


def _sample_next_tokens(logits: Tensor, temperature: float, top_p: float, blocked_ids: list[int],
                        generator: torch.Generator) -> Tensor:
    """One token per row of [rows, V] logits: temperature, then nucleus (the smallest set of most
    probable tokens holding ``top_p`` of the mass), ``blocked_ids`` never; returns [rows] int64."""
    logits = logits.float().cpu() / temperature
    logits[:, blocked_ids] = float("-inf")
    probs = logits.softmax(-1)
    if top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
        sorted_probs[sorted_probs.cumsum(-1) - sorted_probs >= top_p] = 0
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


@torch.inference_mode()
def sample_rollouts(model: nn.Module, encoded: Mapping[str, Tensor], steps: int, *,
                    temperature: float, top_p: float, blocked_ids: list[int],
                    generator: torch.Generator) -> Tensor:
    """Sample ``steps`` tokens after each left-padded prompt row: [rows, steps] int64, on the CPU.

    Runs the model as the caller holds it (steering hook on for docs/method.md §5 step 2).
    ``blocked_ids`` (the end-of-turn ids) get probability 0, so every row has exactly ``steps``
    tokens, drawn from the model's distribution conditioned on not ending the turn, as
    ``generate(min_new_tokens=max_new_tokens)`` draws them. Only temperature and top-p shape it:
    no top-k, repetition penalty or other generation-config defaults. Draws use ``generator`` on
    the CPU, so they depend on the seed, not on the device's RNG.
    """
    attention_mask = encoded["attention_mask"]
    next_input = encoded["input_ids"]
    positions = position_ids(attention_mask)
    keyword = cache_keyword(model)
    cache = None
    sampled = []
    for _ in range(steps):
        output = model(input_ids=next_input, attention_mask=attention_mask,
                       position_ids=positions, use_cache=True, logits_to_keep=1,
                       **{keyword: cache})
        cache = getattr(output, keyword)
        tokens = _sample_next_tokens(output.logits[:, -1], temperature, top_p, blocked_ids,
                                     generator)
        sampled.append(tokens)
        next_input = tokens[:, None].to(attention_mask.device)
        attention_mask = torch.cat([attention_mask, torch.ones_like(next_input)], dim=1)
        positions = positions[:, -1:] + 1
    if not sampled:
        return torch.zeros(attention_mask.shape[0], 0, dtype=torch.int64)
    return torch.stack(sampled, dim=1)


def steered_rollouts(model: nn.Module, tokenizer: PreTrainedTokenizerBase, direction: Direction,
                     prompts: list[str], config: TokensConfig,
                     blocked_ids: list[int]) -> list[tuple[Tensor, Tensor]]:
    """docs/method.md §5 steps 1–2: each prompt N times, continued by H−1 steered samples.

    Rows are prompt-major (a prompt's N copies are adjacent), in batches of ``vote_batch_size``. Each
    batch is (input_ids, attention_mask), both [rows, prompt + H − 1] int64 on the CPU, left
    padded: scoring reuses these ids as they are, never re-tokenising text (docs/method.md §9.2).
    """
    rendered = render_prompts(tokenizer, prompts)
    rows = [text for text in rendered for _ in range(config.vote_samples_per_prompt)]
    device = model_device(model)
    generator = torch.Generator().manual_seed(config.vote_seed)
    batches = []
    starts = range(0, len(rows), config.vote_batch_size)
    with direction.steer(model):
        for start in progress_bar(starts, desc="safety tokens: steered rollouts"):
            batch = rows[start:start + config.vote_batch_size]
            encoded = encode_rendered(tokenizer, batch, device)
            sampled = sample_rollouts(model, encoded, config.horizon - 1,
                                      temperature=config.vote_temperature, top_p=config.vote_top_p,
                                      blocked_ids=blocked_ids, generator=generator)
            batches.append((torch.cat([encoded["input_ids"].cpu(), sampled], dim=1),
                            torch.cat([encoded["attention_mask"].cpu(), torch.ones_like(sampled)],
                                      dim=1)))
    return batches
