"""One step's on-policy samples: the sampled completions, their masks and each row's teacher.

The samples are exactly on-policy (the current student samples them right before the update), so
no importance correction is needed (docs/method.md §6.1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from safesteer.distill.config import DistillConfig
from safesteer.errors import SafesteerError
from safesteer.models.devices import seeded
from safesteer.models.generation import generate_ids
from safesteer.models.kvcache import cache_keyword
from safesteer.models.layout import model_device
from safesteer.models.loading import adapters_merged
from safesteer.scoring import (
    completion_logits,
    prompt_groups,
    read_prompts,
    shared_prompt_completion_logits,
)


@dataclass
class Rollout:
    """One step's on-policy samples on this process.

    ``sequences`` and ``attention_mask`` are [N, P + T]: the prompt ids left-padded to P (mask 0
    on the padding only), then the T sampled tokens. ``completion_mask`` is [N, T] (see
    :func:`completion_mask`); ``texts`` the decoded completions. N = this process's prompts × M,
    each prompt's M rows together. ``prompt_indices`` names each row's training prompt (a
    system-prompted teacher re-reads it) and ``steer_mask`` [N] bool whether the row's teacher is the
    safety teacher (steered, or system-prompted) rather than the plain base. ``step`` is the
    optimizer step (1-based) it was drawn for; ``padding`` marks the stand-in samples of a process
    that had no prompt that step, which run every forward and backward but weigh zero and are
    not counted.
    """

    sequences: Tensor
    attention_mask: Tensor
    completion_mask: Tensor
    texts: list[str]
    prompt_indices: list[int]
    steer_mask: Tensor
    step: int
    padding: bool

    @property
    def prompt_length(self) -> int:
        return self.sequences.shape[1] - self.completion_mask.shape[1]

    def logits(self, model: nn.Module, rows: slice, length: int, temperature: float,
               share_prompts: bool) -> Tensor:
        """``model``'s temperature-scaled logits on the first ``length`` completion tokens of
        ``rows`` after their (student) prompts, [rows, length, vocab]; with ``share_prompts`` each
        distinct prompt is read once for all of its rows (:meth:`prompts`)."""
        prompt_length = self.prompt_length
        end = prompt_length + length
        if share_prompts:
            prompt_ids, prompt_mask, runs = self.prompts(rows)
            return shared_prompt_completion_logits(model, prompt_ids, prompt_mask, runs,
                                                   self.sequences[rows, prompt_length:end], temperature)
        first = int(self.attention_mask[rows, :prompt_length].any(0).int().argmax())
        return completion_logits(model, self.sequences[rows, first:end], self.attention_mask[rows, first:end],
                                 length, temperature)

    def prompts(self, rows: slice) -> tuple[Tensor, Tensor, Tensor]:
        """The distinct prompts of ``rows``, to be read once for all their samples: each run of rows
        that share a prompt (:func:`~safesteer.scoring.prompt_groups`) gives its left-padded ids and
        mask (the columns that pad every one of them left out); and each row's run, int64 [rows]."""
        starts, runs = prompt_groups(self.prompt_indices[rows])
        firsts = torch.tensor(starts, device=self.sequences.device) + (rows.start or 0)
        mask = self.attention_mask[firsts, :self.prompt_length]
        first_column = int(mask.any(0).int().argmax())
        return (self.sequences[firsts, first_column:self.prompt_length], mask[:, first_column:],
                runs.to(self.sequences.device))


def completion_mask(completion_ids: Tensor, eos_token_ids: Sequence[int]) -> Tensor:
    """1 on each generated token up to and including the row's first EOS, 0 after it (padding).

    ``completion_ids`` is [batch, T], the tokens ``generate`` appended to the prompts; rows that
    finished early are filled with the pad id, which may itself be an EOS id, so the mask is
    defined by the first EOS, never by the pad id. A row without EOS (truncated at
    --max-new-tokens) is all ones. Returns [batch, T] int64.
    """
    eos = torch.tensor(list(eos_token_ids), device=completion_ids.device)
    is_eos = torch.isin(completion_ids, eos).long()
    eos_before = is_eos.cumsum(dim=1) - is_eos
    return (eos_before == 0).long()


def sample_completions(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, *,
                       config: DistillConfig, eos_token_ids: list[int], pad_token_id: int, seed: int,
                       step: int, samples: int = 1, share: bool = True) -> Tensor:
    """The tokens ``model`` samples after each left-padded prompt, ``samples`` rows per prompt
    (together), [prompts × samples, T], drawn from ``seed``.

    With ``share`` a prompt's samples share one reading of it (its KV cache up to the last
    token, from which ``generate`` goes on, read in the weights' own products even under a
    bfloat16 generation dtype) instead of each row re-reading it; the draws are the same in the
    weights' dtype. Only temperature and top-p shape the distribution (no top-k, min-p or
    repetition penalty, whatever the model's generation config says), as in the paper's sampler.
    A LoRA student samples with its adapter folded into copies of the weights
    (:func:`~safesteer.models.loading.adapters_merged`).
    """
    rows = torch.arange(len(input_ids), device=input_ids.device).repeat_interleave(samples)
    shared = {}
    try:
        with adapters_merged(model), torch.no_grad():
            if share and samples > 1 and input_ids.shape[1] > 1:
                _, cache = read_prompts(model, input_ids[:, :-1], attention_mask[:, :-1], rows)
                shared[cache_keyword(model)] = cache
            with seeded(seed, model_device(model)):
                return generate_ids(
                    model, {"input_ids": input_ids[rows], "attention_mask": attention_mask[rows]},
                    max_new_tokens=config.max_new_tokens, pad_token_id=pad_token_id, do_sample=True,
                    temperature=config.temperature, top_p=config.top_p, top_k=0, min_p=None,
                    repetition_penalty=1.0, eos_token_id=eos_token_ids, **shared)
    except torch.OutOfMemoryError as error:
        raise SafesteerError(
            f"out of memory while sampling step {step} ({len(rows)} completions of up to "
            f"{config.max_new_tokens} tokens): lower --prompts-per-step, --samples-per-prompt or "
            "--max-new-tokens (--micro-batch-size sizes the training passes)") from error
