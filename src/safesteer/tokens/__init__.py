"""Stage 2: choose the safety-token set S from teacher-vs-base log-probability contrasts
(docs/method.md §5).

The package in reading order: ``vote`` (the vote as pure tensor functions), ``artifact``
(``SafetyTokenSet``, ``safety_tokens.json``), ``vocabulary`` (special and end-of-turn ids),
``rollouts`` (steered samples), ``selection`` (:func:`select_safety_tokens`, the stage on a model).
The names below are the public ones; code inside safesteer imports from the module that defines each.
"""

from safesteer.tokens.artifact import SAFETY_TOKENS_FILE, SafetyTokenSet
from safesteer.tokens.selection import answer_logprobs, select_safety_tokens
from safesteer.tokens.vote import (
    SafetyTokenVotes,
    VoteAccumulator,
    banned_token_mask,
    end_of_turn_valid_mask,
    mean_contrast_tokens,
    select_top_tokens,
    vote_safety_tokens,
)

__all__ = [
    "SAFETY_TOKENS_FILE",
    "SafetyTokenSet",
    "SafetyTokenVotes",
    "VoteAccumulator",
    "answer_logprobs",
    "banned_token_mask",
    "end_of_turn_valid_mask",
    "mean_contrast_tokens",
    "select_safety_tokens",
    "select_top_tokens",
    "vote_safety_tokens",
]
