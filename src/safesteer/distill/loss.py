"""Stage 3 loss: which completion positions enter it and how a step's loss is normalised.

The per-token divergence itself is :func:`safesteer.divergence.divergence`; these two functions
turn it into the scalar one micro-batch backpropagates (docs/method.md §6.5).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

Reduction = Literal["token", "sequence"]


def loss_mask(completion_mask: Tensor, *, skip: int = 0, keep: int = 0) -> Tensor:
    """Positions that enter the loss: completion_mask × 1[t ≥ skip] × 1[t < keep] (docs/method.md §6.5).

    Args:
        completion_mask: [batch, seq], nonzero on generated tokens (final EOS included), zero on
            prompt and padding; a row's completion may start at any offset.
        skip: leave out each completion's first ``skip`` tokens.
        keep: when > 0, keep only each completion's first ``keep`` tokens; must exceed ``skip``.

    t counts from each row's first completion position (t = 0 is the first generated token), not
    from the start of the sequence. Returns [batch, seq] in the dtype of ``completion_mask``;
    skip = keep = 0 (the paper) returns it unchanged.
    """
    if skip < 0 or keep < 0:
        raise ValueError(f"skip and keep must be >= 0, got skip={skip}, keep={keep}")
    if keep > 0 and keep <= skip:
        raise ValueError(f"keep must exceed skip when it is set, got skip={skip}, keep={keep}")
    positions = torch.arange(completion_mask.shape[1], device=completion_mask.device)
    completion_index = positions - (completion_mask != 0).int().argmax(dim=1, keepdim=True)
    window = completion_index >= skip
    if keep > 0:
        window &= completion_index < keep
    return completion_mask * window.to(completion_mask.dtype)


def reduce_loss(
    per_token_loss: Tensor,
    loss_mask: Tensor,
    *,
    reduction: Reduction = "token",
    num_items_in_step: float,
) -> Tensor:
    """Reduce one micro-batch's per-token loss to the scalar to backpropagate.

    Args:
        per_token_loss: [batch, seq] from :func:`safesteer.divergence.divergence`.
        loss_mask: [batch, seq] from :func:`loss_mask`; masked-out positions may hold any value,
            inf and NaN included.
        reduction: how the optimizer step's loss is normalised, see below.
        num_items_in_step: the denominator for the whole optimizer step (all micro-batches of the
            accumulation window, and all processes in a distributed run): masked tokens for
            "token", completions for "sequence". Must be > 0; clamp a zero token count to 1.

    "token" (project default): Σ masked per-token losses / num_items_in_step. Summed over the
    step's micro-batches this is the mean over every masked token of the step, whatever the
    micro-batch split, so every token weighs the same and long completions weigh more.

    "sequence" (the paper and its code; use to reproduce): each completion's mean over its masked
    positions (denominator clamped at 1, so an empty completion adds 0), summed over the
    micro-batch and divided by num_items_in_step. Summed over the step this is the mean over
    completions of per-completion means: every completion weighs the same, whatever its length.
    """
    if per_token_loss.shape != loss_mask.shape or per_token_loss.dim() != 2:
        raise ValueError(
            "per_token_loss and loss_mask must both be [batch, seq], got "
            f"{tuple(per_token_loss.shape)} and {tuple(loss_mask.shape)}"
        )
    if num_items_in_step <= 0:
        raise ValueError(f"num_items_in_step must be > 0, got {num_items_in_step}")
    included = loss_mask != 0
    masked = torch.where(included, per_token_loss, torch.zeros_like(per_token_loss))
    if reduction == "token":
        return masked.sum() / num_items_in_step
    if reduction == "sequence":
        per_completion = masked.sum(dim=1) / included.sum(dim=1).clamp(min=1)
        return per_completion.sum() / num_items_in_step
    raise ValueError(f"reduction must be 'token' or 'sequence', got {reduction!r}")
