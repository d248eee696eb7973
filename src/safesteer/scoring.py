"""Teacher-forced scoring: the logits a model gives fixed token ids, batched with left padding.

Stage 2 (the vote), stage 3 (teacher and student on the sampled completions) and the evaluation
(answer letters, gold-answer NLL, KL to the base) all read next-token logits at the last few
positions of a left-padded batch. They share these functions so that every stage scores a context
exactly as ``generate`` built it: position ids from the attention mask, no KV cache, and only the
positions asked for materialised (``logits_to_keep``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

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
