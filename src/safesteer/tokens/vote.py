"""The vote of docs/method.md §5 steps 4–9 as pure tensor functions: a caller passes log-probabilities
[rows, H, vocab] scored teacher-forced with and without the steering hook (or streams them, slice by
slice, into a :class:`VoteAccumulator`).

Ties are broken deterministically everywhere (docs/method.md §9.6): a higher score first, then the
lower token id, both inside a position's top-K′ and in the final top K.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor


@dataclass(frozen=True)
class SafetyTokenVotes:
    """The safety-token set S and the evidence for it, best first (docs/method.md §5 step 10).

    ``scores`` are vote counts for aggregation "vote" and the mean contrast Δ̄ (nats) for
    "mean". ``teacher_mean_probs`` and ``base_mean_probs`` are p̄_t and p̄_0 at each chosen id,
    averaged over the ``num_valid`` valid (row, position) pairs. Token strings are the caller's,
    who holds the tokenizer.
    """

    token_ids: list[int]
    scores: list[float]
    teacher_mean_probs: list[float]
    base_mean_probs: list[float]
    aggregation: Literal["vote", "mean"]
    num_valid: int


def _inner_top_k_votes(contrast: Tensor, inner_top_k: int) -> Tensor:
    """One vote per row for each of its ``inner_top_k`` highest-contrast tokens: [n, V] -> [V].

    Tokens tied at the cut-off are taken in ascending id order; −inf (banned) tokens never vote,
    even when fewer than ``inner_top_k`` others remain.
    """
    k = min(inner_top_k, contrast.shape[-1])
    threshold = contrast.topk(k, dim=-1).values[:, -1:]
    above = contrast > threshold
    at = contrast == threshold
    room = k - above.sum(dim=-1, keepdim=True)
    chosen = above | (at & (at.cumsum(dim=-1, dtype=torch.int32) <= room))
    chosen &= contrast > float("-inf")
    return chosen.sum(dim=0)


def _ranked(scores: Tensor, top_k: int) -> Tensor:
    """Ids of the ``top_k`` highest scores [V], ties to the lower id (stable descending sort)."""
    return torch.sort(scores, descending=True, stable=True).indices[:top_k]


def select_top_tokens(counts: Tensor, banned: Tensor, top_k: int) -> Tensor:
    """docs/method.md §5 step 9: set banned votes to −1, take the top ``top_k``, drop any with vote ≤ 0.

    Args:
        counts: [V] int64 votes. banned: [V] bool. top_k: K.

    Returns the chosen ids [≤ K], most votes first, ties to the lower id; fewer than K when few
    tokens got votes, which the caller should log and check (docs/method.md §9.6).
    """
    scores = counts.masked_fill(banned.to(counts.device), -1)
    ids = _ranked(scores, top_k)
    return ids[scores[ids] > 0]


class VoteAccumulator:
    """Streams docs/method.md §5 steps 4, 6 and 8 over slices of scored positions, keeping only [V] totals.

    Feed :meth:`add` one [n, V] slice at a time (one answer position of a batch of rows, say);
    the totals are on the CPU whatever the slices' device. It sums votes (``counts``, int64),
    p_t and p_0 (for ``teacher_mean_probs``/``base_mean_probs``) and the contrast (for
    ``mean_contrast``) over valid pairs, float32 within a slice and float64 across slices. The
    votes do not depend on how the pairs are sliced, the means only up to float32 rounding.

    Step 8 bans tokens before each position's top-K′, and the p_min part of the banned set needs
    p̄_t over all pairs (step 7). So the exact procedure streams twice: first with
    ``inner_top_k=0`` (means only, no votes), then, with ``banned_token_mask`` of those means,
    with ``banned`` set, to vote; then :meth:`select`.
    """

    def __init__(self, vocab_size: int, inner_top_k: int = 200, banned: Tensor | None = None):
        if inner_top_k < 0:
            raise ValueError(f"inner_top_k must be >= 0, got {inner_top_k}")
        if banned is not None and (banned.shape != (vocab_size,) or banned.dtype != torch.bool):
            raise ValueError(f"banned must be a [{vocab_size}] bool mask, got "
                             f"{tuple(banned.shape)} {banned.dtype}")
        self.vocab_size = vocab_size
        self.inner_top_k = inner_top_k
        self.banned = banned
        self.counts = torch.zeros(vocab_size, dtype=torch.int64)
        self.num_valid = 0
        self._teacher_prob_sum = torch.zeros(vocab_size, dtype=torch.float64)
        self._base_prob_sum = torch.zeros(vocab_size, dtype=torch.float64)
        self._contrast_sum = torch.zeros(vocab_size, dtype=torch.float64)

    def add(self, teacher_logprobs: Tensor, base_logprobs: Tensor, valid: Tensor) -> None:
        """Count one slice: log-probs [n, V] of the same n contexts with and without the hook.

        ``valid`` [n] bool marks the (row, position) pairs that count (end-of-turn mask).
        """
        shape = teacher_logprobs.shape
        if base_logprobs.shape != shape or len(shape) != 2 or shape[1] != self.vocab_size:
            raise ValueError(
                f"teacher_logprobs and base_logprobs must both be [n, {self.vocab_size}], got "
                f"{tuple(shape)} and {tuple(base_logprobs.shape)}"
            )
        if valid.shape != shape[:1] or valid.dtype != torch.bool:
            raise ValueError(f"valid must be a [{shape[0]}] bool mask, got {tuple(valid.shape)} "
                             f"{valid.dtype}")
        teacher = teacher_logprobs[valid].float()
        base = base_logprobs[valid].float()
        if teacher.shape[0] == 0:
            return
        self.num_valid += teacher.shape[0]
        self._teacher_prob_sum += teacher.exp().sum(dim=0).cpu()
        self._base_prob_sum += base.exp().sum(dim=0).cpu()
        contrast = teacher - base
        self._contrast_sum += contrast.sum(dim=0).cpu()
        if self.inner_top_k == 0:
            return
        if self.banned is not None:
            contrast.masked_fill_(self.banned.to(contrast.device), float("-inf"))
        self.counts += _inner_top_k_votes(contrast, self.inner_top_k).cpu()

    def _mean(self, total: Tensor) -> Tensor:
        if self.num_valid == 0:
            raise ValueError(
                "no valid (row, position) pairs: the base model ended every turn at the first "
                "position; use other prompts or check the end-of-turn ids"
            )
        return total / self.num_valid

    @property
    def teacher_mean_probs(self) -> Tensor:
        """p̄_t [V] float64: the steered teacher's probabilities averaged over valid pairs."""
        return self._mean(self._teacher_prob_sum)

    @property
    def base_mean_probs(self) -> Tensor:
        """p̄_0 [V] float64: the base model's probabilities averaged over valid pairs."""
        return self._mean(self._base_prob_sum)

    @property
    def mean_contrast(self) -> Tensor:
        """Δ̄ [V] float64: log p_t − log p_0 averaged over valid pairs (legacy mean variant)."""
        return self._mean(self._contrast_sum)

    def select(self, top_k: int = 50) -> SafetyTokenVotes:
        """docs/method.md §5 step 9 on the votes so far, with the ``banned`` mask the votes were
        counted under."""
        banned = self.banned
        if banned is None:
            banned = torch.zeros(self.vocab_size, dtype=torch.bool)
        ids = select_top_tokens(self.counts, banned, top_k)
        return _result(self, ids, self.counts[ids].tolist(), "vote")


def _result(
    accumulator: VoteAccumulator,
    ids: Tensor,
    scores: list[float],
    aggregation: Literal["vote", "mean"],
) -> SafetyTokenVotes:
    return SafetyTokenVotes(
        token_ids=ids.tolist(),
        scores=scores,
        teacher_mean_probs=accumulator.teacher_mean_probs[ids].tolist(),
        base_mean_probs=accumulator.base_mean_probs[ids].tolist(),
        aggregation=aggregation,
        num_valid=accumulator.num_valid,
    )


def add_positions(
    accumulator: VoteAccumulator, teacher_logprobs: Tensor, base_logprobs: Tensor, valid: Tensor
) -> VoteAccumulator:
    """Feed [rows, H, V] log-probs to ``accumulator`` one position (one [rows, V]) at a time."""
    if teacher_logprobs.dim() != 3 or valid.shape != teacher_logprobs.shape[:2]:
        raise ValueError(
            "log-probs must be [rows, H, vocab] and valid [rows, H], got "
            f"{tuple(teacher_logprobs.shape)} and {tuple(valid.shape)}"
        )
    for position in range(teacher_logprobs.shape[1]):
        accumulator.add(
            teacher_logprobs[:, position], base_logprobs[:, position], valid[:, position]
        )
    return accumulator


def select_by_mean(accumulator: VoteAccumulator, banned: Tensor, top_k: int) -> SafetyTokenVotes:
    """The K highest mean contrasts among unbanned tokens (ties to the lower id)."""
    scores = accumulator.mean_contrast.masked_fill(banned.cpu(), float("-inf"))
    ids = _ranked(scores, top_k)
    ids = ids[scores[ids] > float("-inf")]
    return _result(accumulator, ids, scores[ids].tolist(), "mean")


def vote_safety_tokens(
    teacher_logprobs: Tensor,
    base_logprobs: Tensor,
    valid: Tensor,
    *,
    banned: Tensor,
    top_k: int = 50,
    inner_top_k: int = 200,
) -> SafetyTokenVotes:
    """Safety tokens by vote (docs/method.md §5 steps 4, 8, 9).

    Args:
        teacher_logprobs: [rows, H, V] full-vocabulary log-probs with the steering hook.
        base_logprobs: [rows, H, V] without it, on identical tokens.
        valid: [rows, H] bool, from :func:`end_of_turn_valid_mask`.
        banned: [V] bool, from :func:`banned_token_mask`; banned tokens get Δ = −∞ before each
            position's top-K′ and vote −1 in the final top K, so they are never chosen.
        top_k: K, the most tokens kept. inner_top_k: K′, the tokens each valid pair votes for.

    Each valid (row, position) votes once for each of its K′ tokens of highest
    Δ = log p_t − log p_0; the K most-voted tokens with at least one vote form S. Works one
    position at a time, so only one [rows, V] float slice exists beyond the inputs.
    """
    if inner_top_k < 1:
        raise ValueError(f"inner_top_k must be >= 1, got {inner_top_k}")
    accumulator = VoteAccumulator(teacher_logprobs.shape[-1], inner_top_k, banned)
    return add_positions(accumulator, teacher_logprobs, base_logprobs, valid).select(top_k)


def mean_contrast_tokens(
    teacher_logprobs: Tensor,
    base_logprobs: Tensor,
    valid: Tensor,
    *,
    banned: Tensor,
    top_k: int = 50,
) -> SafetyTokenVotes:
    """Safety tokens by mean contrast (the legacy ``mean`` variant of docs/method.md §5).

    Same inputs as :func:`vote_safety_tokens`. Averages Δ = log p_t − log p_0 over the valid
    pairs, sets banned tokens to −∞ and keeps the K highest (ties to the lower id); only banned
    tokens are dropped, so a negative Δ̄ can still be chosen.
    """
    accumulator = VoteAccumulator(teacher_logprobs.shape[-1], inner_top_k=0)
    add_positions(accumulator, teacher_logprobs, base_logprobs, valid)
    return select_by_mean(accumulator, banned, top_k)


def banned_token_mask(
    teacher_mean_probs: Tensor, special_ids: list[int], token_strings: list[str], p_min: float
) -> Tensor:
    """docs/method.md §5 step 7: the tokens S may never contain, as a [V] bool mask.

    Args:
        teacher_mean_probs: p̄_t [V] over valid pairs (``VoteAccumulator.teacher_mean_probs``).
        special_ids: every special token id of the tokenizer.
        token_strings: the token string of every id 0..V−1 (pad ids the tokenizer lacks with "").
        p_min: tokens the steered teacher rarely produces (p̄_t < p_min) are banned.

    Banned: the special ids, every token whose string contains "<|", and every p̄_t(v) < p_min.
    """
    vocab_size = teacher_mean_probs.shape[0]
    if len(token_strings) != vocab_size:
        raise ValueError(f"token_strings must have one entry per id ({vocab_size}), "
                         f"got {len(token_strings)}")
    banned = teacher_mean_probs < p_min
    banned[special_ids] = True
    banned[[index for index, text in enumerate(token_strings) if "<|" in text]] = True
    return banned


def end_of_turn_valid_mask(base_argmax: Tensor, end_ids: list[int]) -> Tensor:
    """docs/method.md §5 step 5: which (row, position) pairs may vote, [rows, H] bool.

    ``base_argmax`` [rows, H] is the unsteered model's most probable next token at each answer
    position. From the first position whose argmax is an end-of-turn id (EOS, end-of-turn and
    end-of-text specials) on, the row is invalid: that position and every later one.
    """
    is_end = torch.isin(base_argmax, torch.tensor(end_ids, dtype=base_argmax.dtype,
                                                  device=base_argmax.device))
    return is_end.cumsum(dim=1) == 0
