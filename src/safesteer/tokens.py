"""Stage 2: choose the safety-token set S from teacher-vs-base log-probability contrasts.

Two layers, both for docs/method.md §5:

* Pure tensor functions for steps 4–9. A caller passes log-probabilities [rows, H, vocab] scored
  teacher-forced with and without the steering hook (or streams them, slice by slice, into a
  :class:`VoteAccumulator`).
* The model-facing part, :func:`select_safety_tokens`: steered rollouts, teacher-forced scoring,
  masks, the banned set and the two streamed passes, returning a :class:`SafetyTokenSet` that is
  saved as ``safety_tokens.json`` for the distillation stage.

Ties are broken deterministically everywhere (docs/method.md §9.6): a higher score first, then the lower
token id, both inside a position's top-K′ and in the final top K.
"""

from __future__ import annotations

import inspect
import logging
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from safesteer.data.splits import prompts_sha256
from safesteer.errors import SafesteerError
from safesteer.io import read_json, write_json
from safesteer.models import encode_rendered, model_device, position_ids, render_prompts
from safesteer.progress import progress_bar
from safesteer.scoring import last_logits
from safesteer.tokens_config import TokensConfig

if TYPE_CHECKING:
    from safesteer.direction.artifact import Direction

logger = logging.getLogger(__name__)


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


def _add_positions(
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


def _select_by_mean(accumulator: VoteAccumulator, banned: Tensor, top_k: int) -> SafetyTokenVotes:
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
    return _add_positions(accumulator, teacher_logprobs, base_logprobs, valid).select(top_k)


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
    _add_positions(accumulator, teacher_logprobs, base_logprobs, valid)
    return _select_by_mean(accumulator, banned, top_k)


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


# ------------------------------------------------------------------------- the model-facing stage

SAFETY_TOKENS_FILE = "safety_tokens.json"
# Special-token names that end an answer: <|im_end|>, <|eot_id|>, <|endoftext|>, <end_of_turn>, ...
_END_OF_TURN_NAME = re.compile(r"end|eot|eos", re.IGNORECASE)
_TOKEN_COLUMN = 24


@dataclass
class SafetyTokenSet:
    """The frozen safety-token set S (docs/method.md §5 step 10), best first; ``safety_tokens.json``.

    ``scores`` are votes (aggregation "vote") or mean contrasts in nats ("mean");
    ``teacher_mean_probs``/``base_mean_probs`` are p̄_t and p̄_0 over the valid pairs. ``settings``
    records how S was chosen: the :class:`TokensConfig`, end-of-turn ids, pair counts, the prompts'
    sha256 and the steering layer and coefficient.
    """

    ids: list[int]
    strings: list[str]
    scores: list[float]
    teacher_mean_probs: list[float]
    base_mean_probs: list[float]
    settings: dict[str, Any] = field(default_factory=dict)

    def save(self, output_dir: str | Path) -> Path:
        path = Path(output_dir) / SAFETY_TOKENS_FILE
        write_json(path, asdict(self))
        return path

    @classmethod
    def load(cls, path: str | Path) -> SafetyTokenSet:
        """Load from a run directory or its ``safety_tokens.json``."""
        path = Path(path)
        file = path / SAFETY_TOKENS_FILE if path.is_dir() else path
        if not file.is_file():
            raise SafesteerError(f"{file} does not exist; run `safesteer tokens` first or give a run "
                                 f"directory holding {SAFETY_TOKENS_FILE}")
        payload = read_json(file)
        lists = ("ids", "strings", "scores", "teacher_mean_probs", "base_mean_probs")
        if (not isinstance(payload, dict) or not isinstance(payload.get("settings"), dict)
                or any(not isinstance(payload.get(name), list) for name in lists)):
            raise SafesteerError(f"{file}: not a safety-token file (needs the lists "
                                 f"{', '.join(lists)} and a settings object)")
        if len({len(payload[name]) for name in lists}) != 1:
            raise SafesteerError(f"{file}: the lists {', '.join(lists)} differ in length")
        if not all(type(token_id) is int and token_id >= 0 for token_id in payload["ids"]):
            raise SafesteerError(f"{file}: ids must be non-negative integers")
        if not all(isinstance(text, str) for text in payload["strings"]):
            raise SafesteerError(f"{file}: strings must be strings")
        return cls(**{name: payload[name] for name in (*lists, "settings")})

    def table(self) -> str:
        """Fixed-width table of S for the terminal: rank, id, token repr, score, p̄_0, p̄_t."""
        score_name = "votes" if self.settings.get("aggregation", "vote") == "vote" else "mean_delta"
        header = (f"{'rank':>4}  {'id':>7}  {'token':<{_TOKEN_COLUMN}}  {score_name:>10}  "
                  f"{'mean_p_base':>11}  {'mean_p_teacher':>14}")
        lines = [header, "-" * len(header)]
        rows = zip(self.ids, self.strings, self.scores, self.base_mean_probs,
                   self.teacher_mean_probs, strict=True)
        for rank, (token_id, text, score, base, teacher) in enumerate(rows, start=1):
            shown = repr(text)
            if len(shown) > _TOKEN_COLUMN:
                shown = shown[:_TOKEN_COLUMN - 1] + "…"
            score_text = f"{score:.0f}" if score_name == "votes" else f"{score:.4f}"
            lines.append(f"{rank:>4}  {token_id:>7}  {shown:<{_TOKEN_COLUMN}}  {score_text:>10}  "
                         f"{base:>11.3e}  {teacher:>14.3e}")
        return "\n".join(lines)


def special_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every special id: the named ones (BOS, EOS, pad, ...) and added tokens flagged special,
    which is where chat markers such as Llama-3's ``<|eot_id|>`` live."""
    ids = set(tokenizer.all_special_ids)
    ids.update(index for index, token in tokenizer.added_tokens_decoder.items() if token.special)
    return sorted(ids)


def end_of_turn_ids(tokenizer: PreTrainedTokenizerBase, model: nn.Module) -> list[int]:
    """Ids that end an answer (docs/method.md §5 step 5): EOS of the tokenizer and of the
    generation config, and every special token whose name contains "end", "eot" or "eos".

    Generous on purpose: an extra id only invalidates positions where the base model's argmax is
    that token, while a missing one lets positions after the answer's end vote.
    """
    ids = set() if tokenizer.eos_token_id is None else {tokenizer.eos_token_id}
    generation_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if generation_eos is not None:
        ids.update([generation_eos] if isinstance(generation_eos, int) else generation_eos)
    specials = special_token_ids(tokenizer)
    names = tokenizer.convert_ids_to_tokens(specials)
    ids.update(index for index, name in zip(specials, names, strict=True)
               if _END_OF_TURN_NAME.search(name))
    return sorted(ids)


def token_strings(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> list[str]:
    """The decoded text of ids 0..vocab_size−1; "" for ids beyond the tokenizer (padded rows of
    the embedding matrix)."""
    known = min(vocab_size, len(tokenizer))
    decoded = tokenizer.batch_decode([[index] for index in range(known)],
                                     clean_up_tokenization_spaces=False)
    return [*decoded, *[""] * (vocab_size - known)]


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


def _cache_keyword(model: nn.Module) -> str:
    """The KV-cache argument of ``model.forward`` (and its output): transformers 5.24 renamed
    ``past_key_values`` to ``cache``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


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
    cache_keyword = _cache_keyword(model)
    cache = None
    sampled = []
    for _ in range(steps):
        output = model(input_ids=next_input, attention_mask=attention_mask,
                       position_ids=positions, use_cache=True, logits_to_keep=1,
                       **{cache_keyword: cache})
        cache = getattr(output, cache_keyword)
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
        _add_positions(accumulator, teacher, base, valid)


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
        chosen = _select_by_mean(means, banned, config.num_safety_tokens)
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
