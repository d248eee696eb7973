"""Stage 2 on a model (docs/method.md §5): steered rollouts, teacher-forced scoring with and without
the hook, the end-of-turn mask, the banned set and the two streamed passes, returning the
:class:`~safesteer.tokens.artifact.SafetyTokenSet`.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from safesteer.data.splits import prompts_sha256
from safesteer.errors import SafesteerError
from safesteer.models.layout import model_device
from safesteer.progress import progress_bar
from safesteer.scoring import last_logits
from safesteer.tokens.artifact import SafetyTokenSet
from safesteer.tokens.rollouts import steered_rollouts
from safesteer.tokens.vocabulary import end_of_turn_ids, special_token_ids, token_strings
from safesteer.tokens.vote import (
    VoteAccumulator,
    add_positions,
    banned_token_mask,
    end_of_turn_valid_mask,
    select_by_mean,
)
from safesteer.tokens_config import TokensConfig

if TYPE_CHECKING:
    from safesteer.direction.artifact import Direction

logger = logging.getLogger(__name__)


@torch.inference_mode()
def answer_logprobs(model: nn.Module, direction: Direction, input_ids: Tensor,
                    attention_mask: Tensor, horizon: int) -> tuple[Tensor, Tensor]:
    """docs/method.md §5 step 3: teacher and base log-probs, each [rows, H, V] float32, at the H
    answer positions.

    The last H positions of prompt ‖ rollout predict answer tokens j = 1..H: the last prompt
    position, then each of the H−1 rollout tokens. Both passes see the same ids and positions;
    the full-vocabulary log-softmax is taken in float32 (docs/method.md §9.4).
    """
    device = model_device(model)
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)

    def logprobs() -> Tensor:
        return last_logits(model, input_ids, attention_mask, horizon).float().log_softmax(dim=-1)

    with direction.steer(model):
        teacher = logprobs()
    return teacher, logprobs()


def _accumulate_batches(model: nn.Module, direction: Direction,
                        batches: list[tuple[Tensor, Tensor]], end_ids: list[int], horizon: int,
                        accumulator: VoteAccumulator, desc: str) -> None:
    """docs/method.md §5 steps 3–6 (and 8 if ``accumulator`` votes), one batch and one position
    at a time."""
    for input_ids, attention_mask in progress_bar(batches, desc=desc):
        teacher, base = answer_logprobs(model, direction, input_ids, attention_mask, horizon)
        valid = end_of_turn_valid_mask(base.argmax(dim=-1), end_ids)
        add_positions(accumulator, teacher, base, valid)


def select_safety_tokens(model: nn.Module, tokenizer: PreTrainedTokenizerBase,
                         direction: Direction, prompts: list[str],
                         config: TokensConfig) -> SafetyTokenSet:
    """Stage 2 (docs/method.md §5): the safety tokens S on which the distillation loss is summed.

    ``model`` is the base model with no steering hook of its own; ``direction.steer`` makes the
    teacher for the rollouts and the teacher side of the scoring. Uses the first ``vote_n_prompts``
    of ``prompts``. Steered rollouts are sampled once; the scoring then streams over them twice,
    keeping one batch's [rows, H, V] log-probs at a time: first for p̄_t, which the p_min part of
    the banned set needs, then (aggregation "vote") to count votes with that set banned.

    Raises SafesteerError when no (row, position) pair is valid or fewer than ``min_safety_tokens``
    tokens survive.
    """
    prompts = prompts[:config.vote_n_prompts]
    if not prompts:
        raise SafesteerError("no prompts for safety-token selection; check --vote-prompts")
    vocab_size = model.get_output_embeddings().weight.shape[0]
    end_ids = [index for index in end_of_turn_ids(tokenizer, model) if index < vocab_size]
    batches = steered_rollouts(model, tokenizer, direction, prompts, config, blocked_ids=end_ids)

    means = VoteAccumulator(vocab_size, inner_top_k=0)
    _accumulate_batches(model, direction, batches, end_ids, config.horizon, means,
                        desc="safety tokens: mean probabilities")
    if means.num_valid == 0:
        raise SafesteerError(
            "no valid (rollout, position) pair: the base model's most likely next token is an "
            f"end-of-turn token (ids {end_ids}) at the first answer position of every rollout; "
            "use other --vote-prompts"
        )
    strings = token_strings(tokenizer, vocab_size)
    specials = [index for index in special_token_ids(tokenizer) if index < vocab_size]
    banned = banned_token_mask(means.teacher_mean_probs, specials, strings, config.p_min)
    if config.aggregation == "mean":
        chosen = select_by_mean(means, banned, config.num_safety_tokens)
    else:
        votes = VoteAccumulator(vocab_size, config.inner_top_k, banned)
        _accumulate_batches(model, direction, batches, end_ids, config.horizon, votes,
                            desc="safety tokens: votes")
        chosen = votes.select(config.num_safety_tokens)

    size = len(chosen.token_ids)
    logger.info("selected %d safety tokens (K = %d) from %d valid pairs; %d of %d tokens banned",
                size, config.num_safety_tokens, chosen.num_valid, int(banned.sum()), vocab_size)
    if size < config.min_safety_tokens:
        raise SafesteerError(
            f"only {size} safety token(s) survived, fewer than --min-safety-tokens "
            f"{config.min_safety_tokens} ({chosen.num_valid} valid pairs, {int(banned.sum())} of "
            f"{vocab_size} tokens banned): "
            f"lower --p-min (now {config.p_min:g}), or raise --horizon, --vote-n-prompts or "
            "--vote-samples-per-prompt for more voting pairs"
        )
    settings = {
        **asdict(config),
        "num_prompts": len(prompts),
        "prompts_sha256": prompts_sha256(prompts),
        "num_rows": len(prompts) * config.vote_samples_per_prompt,
        "num_valid_pairs": chosen.num_valid,
        "end_of_turn_ids": end_ids,
        "end_of_turn_tokens": tokenizer.convert_ids_to_tokens(end_ids),
        "num_banned": int(banned.sum()),
        "vocab_size": vocab_size,
        "direction_layer": direction.layer,
        "direction_coefficient": direction.coefficient,
    }
    return SafetyTokenSet(
        ids=chosen.token_ids,
        strings=[strings[index] for index in chosen.token_ids],
        scores=chosen.scores,
        teacher_mean_probs=chosen.teacher_mean_probs,
        base_mean_probs=chosen.base_mean_probs,
        settings=settings,
    )
