"""Stage 1's shared numerics, pure functions of logits and activations: the refusal score
(docs/method.md §3.2), KL to the base and the float64 difference of means (docs/method.md §3.4–3.5).
"""

from __future__ import annotations

from typing import Any

import torch

REFUSAL_OPENERS = ("I", "As", "Sorry", "I'm", "Unfortunately")


def refusal_token_ids(tokenizer: Any) -> list[int]:
    """First token of each common refusal opener, from the tokenizer (never hard-coded ids)."""
    ids = {tokenizer.encode(word, add_special_tokens=False)[0] for word in REFUSAL_OPENERS}
    return sorted(ids)


def refusal_score(last_logits: torch.Tensor, refusal_ids: list[int]) -> torch.Tensor:
    """``log P_ref - log(1 - P_ref)`` per row of ``[batch, vocab]`` next-token logits (float64)."""
    probs = torch.softmax(last_logits.double(), dim=-1)
    p_ref = probs[:, refusal_ids].sum(-1)
    return torch.log(p_ref + 1e-8) - torch.log(1 - p_ref + 1e-8)


def kl_divergence(base_logits: torch.Tensor, other_logits: torch.Tensor) -> torch.Tensor:
    """``KL(p_base || p_other)`` per row of ``[batch, vocab]`` logits, float64 with eps 1e-6."""
    p = torch.softmax(base_logits.double(), dim=-1)
    q = torch.softmax(other_logits.double(), dim=-1)
    return (p * (torch.log(p + 1e-6) - torch.log(q + 1e-6))).sum(-1)


def difference_of_means(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Mean over dim 0 of ``first`` minus that of ``second``, accumulated in float64."""
    return first.double().mean(0) - second.double().mean(0)
