"""Teacher-forced scoring: the logits a model gives fixed token ids, batched with left padding.

Stage 2 (the vote), stage 3 (teacher and student on the sampled completions) and the evaluation
(answer letters, gold-answer NLL, KL to the base) all read next-token logits at the last few
positions of a left-padded batch. They share these functions so that every stage scores a context
exactly as ``generate`` built it: position ids from the attention mask, no KV cache, and only the
positions asked for materialised (``logits_to_keep``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from safesteer.models.kvcache import cache_keyword
from safesteer.models.rendering import position_ids


def left_pad(rows: Sequence[Sequence[int]], pad_id: int,
             device: torch.device | str) -> tuple[Tensor, Tensor]:
    """Token id rows left-padded to the longest, and their attention mask: two [len(rows), width] int64.

    Left padding puts every row's last token in the last column, where generation continues.
    """
    width = max((len(row) for row in rows), default=0)
    input_ids = torch.tensor([[pad_id] * (width - len(row)) + list(row) for row in rows],
                             dtype=torch.long, device=device).view(len(rows), width)
    attention_mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows],
                                  dtype=torch.long, device=device).view(len(rows), width)
    return input_ids, attention_mask


def last_logits(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, count: int) -> Tensor:
    """Next-token logits at the last ``count`` positions of a left-padded batch.

    ``input_ids`` and ``attention_mask`` are [batch, seq]; returns [batch, count, vocab] in the
    model's dtype. Position ids come from the mask, so a padded row is scored as it would be alone.
    """
    return model(input_ids=input_ids, attention_mask=attention_mask,
                 position_ids=position_ids(attention_mask), logits_to_keep=count,
                 use_cache=False).logits


def completion_logits(model: nn.Module, sequences: Tensor, attention_mask: Tensor,
                      completion_length: int, temperature: float = 1.0) -> Tensor:
    """Next-token logits at the positions that predict the last ``completion_length`` tokens.

    ``sequences`` and ``attention_mask`` are [batch, P + T] (left-padded prompt, then completion);
    returns [batch, T, vocab] in the model's dtype, divided by ``temperature`` (no copy at 1).
    """
    logits = last_logits(model, sequences[:, :-1], attention_mask[:, :-1], completion_length)
    return logits if temperature == 1.0 else logits / temperature


def prompt_groups(prompt_indices: Sequence[int]) -> tuple[list[int], Tensor]:
    """The runs of consecutive rows that continue the same prompt: (each run's first row, every
    row's run number, int64 [rows]). Stage 3 keeps a prompt's M samples together, so a run is a
    prompt's samples within one micro-batch."""
    starts: list[int] = []
    runs = []
    for row, index in enumerate(prompt_indices):
        if not starts or index != prompt_indices[row - 1]:
            starts.append(row)
        runs.append(len(starts) - 1)
    return starts, torch.tensor(runs, dtype=torch.long)


def read_prompts(model: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor,
                 row_prompts: Tensor) -> tuple[Tensor, Any]:
    """Read each distinct prompt once: its next-token logits at the last position and its KV cache,
    both gathered to ``row_prompts`` (each completion row's prompt, int64 [N]).

    ``prompt_ids`` and ``prompt_mask`` are [prompts, P], left-padded. Returns ([N, 1, vocab], the
    cache of N rows). Gathering is differentiable, so a student's gradient reaches the prompt's
    keys and values from all of its rows, as when every row re-reads its prompt.
    """
    output = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=position_ids(prompt_mask),
                   logits_to_keep=1, use_cache=True)
    cache = getattr(output, cache_keyword(model))
    cache.reorder_cache(row_prompts)
    return output.logits.index_select(0, row_prompts), cache


def continue_prompts(model: nn.Module, first: Tensor, cache: Any, prompt_mask: Tensor, completions: Tensor,
                     temperature: float = 1.0) -> Tensor:
    """:func:`completion_logits` of ``completions`` [N, T] after the prompts :func:`read_prompts`
    read: ``first`` [N, 1, vocab] predicts their first token, and the other T - 1 positions are
    read after ``cache``; ``prompt_mask`` is the prompts' mask gathered to the N rows."""
    logits = first
    if completions.shape[1] > 1:
        tokens = completions[:, :-1]
        mask = torch.cat([prompt_mask, torch.ones_like(tokens)], 1)
        positions = position_ids(mask)[:, prompt_mask.shape[1]:]
        rest = model(input_ids=tokens, attention_mask=mask, position_ids=positions, use_cache=True,
                     **{cache_keyword(model): cache}).logits
        logits = torch.cat([first, rest], 1)
    return logits if temperature == 1.0 else logits / temperature


def shared_prompt_completion_logits(model: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor,
                                    row_prompts: Tensor, completions: Tensor,
                                    temperature: float = 1.0) -> Tensor:
    """:func:`completion_logits` of ``completions`` [N, T] after their prompts, each distinct
    prompt read once rather than once per row: the same logits, within float rounding, for about
    (P + M·T) / (M·(P + T)) of the compute with M samples of P-token prompts."""
    first, cache = read_prompts(model, prompt_ids, prompt_mask, row_prompts)
    row_masks = prompt_mask.index_select(0, row_prompts)
    return continue_prompts(model, first, cache, row_masks, completions, temperature)
