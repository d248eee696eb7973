"""Stage 1's model passes: next-token logits after each rendered prompt, and block inputs at the
post-instruction positions (docs/method.md §3.3) or over the tokens of an answer (docs/method.md §3.6).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from safesteer.direction.numerics import refusal_score
from safesteer.models.layout import model_device
from safesteer.models.rendering import encode_rendered, position_ids, render_prompts
from safesteer.progress import progress_bar
from safesteer.steering import block_inputs_at_last_position, record_block_inputs

_PLACEHOLDER = "SAFESTEERPLACEHOLDER"


def post_instruction_length(tokenizer: Any) -> int:
    """Number of template tokens after the user's instruction (Arditi's EOI positions)."""
    rendered = render_prompts(tokenizer, [_PLACEHOLDER])[0]
    suffix = rendered.split(_PLACEHOLDER, 1)[1]
    return max(1, len(tokenizer.encode(suffix, add_special_tokens=False)))


def _forward_last(model: nn.Module, encoded: Any) -> torch.Tensor:
    """Last-position logits of a left-padded batch."""
    positions = position_ids(encoded["attention_mask"])
    return model(**encoded, position_ids=positions, use_cache=False, logits_to_keep=1).logits[:, -1]


def _batches(items: list[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


@torch.inference_mode()
def last_position_logits(model: nn.Module, tokenizer: Any, prompts: list[str],
                         batch_size: int) -> torch.Tensor:
    """Next-token logits ``[n, vocab]`` (float32, cpu) after each rendered prompt."""
    rows = []
    for batch in _batches(render_prompts(tokenizer, prompts), batch_size):
        encoded = encode_rendered(tokenizer, batch, model_device(model))
        rows.append(_forward_last(model, encoded).float().cpu())
    return torch.cat(rows)


@torch.inference_mode()
def last_token_block_inputs(model: nn.Module, tokenizer: Any, prompts: list[str], last_layer: int,
                            batch_size: int, desc: str | None = None) -> torch.Tensor:
    """Blocks ``0..last_layer``'s inputs at each rendered prompt's last token,
    ``[n, last_layer + 1, d]`` (float32, cpu); each forward stops at block ``last_layer``."""
    rows = []
    rendered = render_prompts(tokenizer, prompts)
    for batch in progress_bar(list(_batches(rendered, batch_size)), desc=desc, disable=desc is None):
        encoded = encode_rendered(tokenizer, batch, model_device(model))
        rows.append(block_inputs_at_last_position(model, last_layer, encoded["input_ids"],
                                                  encoded["attention_mask"]).float().cpu())
    return torch.cat(rows)


@torch.inference_mode()
def post_instruction_pass(model: nn.Module, tokenizer: Any, prompts: list[str], positions: int,
                          refusal_ids: list[int], batch_size: int,
                          desc: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward per batch giving both what extraction and the refusal filter need.

    Returns every block's input at the last ``positions`` tokens, ``[n, positions, layers, d]``
    (float32, cpu), and each prompt's refusal score ``[n]`` (float64).
    """
    activations, scores = [], []
    rendered = render_prompts(tokenizer, prompts)
    for batch in progress_bar(list(_batches(rendered, batch_size)), desc=desc, disable=desc is None):
        encoded = encode_rendered(tokenizer, batch, model_device(model))
        with record_block_inputs(model) as captured:
            scores.append(refusal_score(_forward_last(model, encoded), refusal_ids).cpu())
        activations.append(torch.stack([captured[layer][:, -positions:].float().cpu()
                                        for layer in sorted(captured)], 2))
    return torch.cat(activations), torch.cat(scores)


@torch.inference_mode()
def mean_response_activations(model: nn.Module, tokenizer: Any, prompts: list[str],
                              responses: list[str], batch_size: int,
                              desc: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean block input over the response tokens of ``prompt || response`` pairs.

    Returns ``[layers, d]`` means and ``[layers]`` mean residual norms, both float64; each pair
    counts once, whatever its length.
    """
    means: torch.Tensor | None = None
    norms: torch.Tensor | None = None
    rendered = render_prompts(tokenizer, prompts)
    pairs = list(zip(rendered, responses, strict=True))
    for start in progress_bar(range(0, len(pairs), batch_size), desc=desc, disable=desc is None):
        batch = pairs[start:start + batch_size]
        lengths = [len(tokenizer.encode(response, add_special_tokens=False))
                   for _, response in batch]
        encoded = encode_rendered(tokenizer, [prompt + response for prompt, response in batch],
                                  model_device(model))
        with record_block_inputs(model) as captured:
            _forward_last(model, encoded)
        seq = encoded["input_ids"].shape[1]
        mask = torch.zeros(len(batch), seq, dtype=torch.float64)
        for row, length in enumerate(lengths):
            mask[row, seq - length:] = 1.0 / length
        acts = torch.stack([captured[layer].double().cpu() for layer in sorted(captured)], 1)
        batch_means = torch.einsum("bs,blsd->ld", mask, acts)
        batch_norms = torch.einsum("bs,bls->l", mask, acts.norm(dim=-1))
        means = batch_means if means is None else means + batch_means
        norms = batch_norms if norms is None else norms + batch_norms
    assert means is not None and norms is not None
    return means / len(pairs), norms / len(pairs)
