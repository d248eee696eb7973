"""The student and its teachers on one copy of the weights (docs/method.md §9.9).

With LoRA the student is an adapter on the base model, the plain base is the model with the
adapter disabled, and the safety teacher is that plus the steering hook. Without LoRA the teachers
run on a frozen copy of the base. Each row of a batch gets its own teacher (docs/method.md §6.9):
the safety teacher (steered, or the base reading a safety system prompt) or the plain base.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
from peft import LoraConfig, get_peft_model
from torch import Tensor, nn
from transformers import PreTrainedModel

from safesteer.direction.artifact import Direction
from safesteer.distill.config import DistillConfig
from safesteer.distill.rollout import Rollout
from safesteer.errors import SafesteerError
from safesteer.models.devices import seeded
from safesteer.models.loading import adapters_disabled
from safesteer.scoring import completion_logits, continue_prompts, left_pad, prompt_groups, read_prompts


def build_student(base: PreTrainedModel, config: DistillConfig,
                  device: torch.device) -> tuple[nn.Module, nn.Module]:
    """(student, teacher weights): the float32 LoRA adapter on ``base`` and that same model, or,
    with --no-use-lora, ``base`` itself (upcast to float32, its own master copy) and a frozen copy."""
    if config.gradient_checkpointing:
        if not base.supports_gradient_checkpointing:
            raise SafesteerError(f"--gradient-checkpointing: {type(base).__name__} does not "
                                 "support it")
        # transformers >= 5.x renames the API; older releases only have gradient_checkpointing_enable.
        if hasattr(base, "activation_checkpointing_enable"):
            base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.use_lora:
        lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                          target_modules=config.target_modules(), task_type="CAUSAL_LM")
        # The adapter's random initialisation is drawn from --seed, leaving the caller's RNG alone.
        with seeded(config.seed, device):
            student: nn.Module = get_peft_model(base, lora)
        return student, student
    frozen = copy.deepcopy(base).eval().requires_grad_(False)
    if base.dtype in (torch.bfloat16, torch.float16):
        base.float()
    return base.requires_grad_(True), frozen


class Teachers:
    """The plain base and the safety teacher, in eval mode, on the student's weights (or the frozen
    copy), with the prompt ids each teacher reads: the student's, or with
    --teacher-system-prompt the system-prompted ones for the safety teacher. With
    ``share_prompts`` a prompt is read once for all of its samples (docs/method.md §6.1)."""

    def __init__(self, student: nn.Module, weights: nn.Module, direction: Direction,
                 prompt_ids: list[list[int]], teacher_prompt_ids: list[list[int]] | None,
                 pad_token_id: int, temperature: float, device: torch.device, share_prompts: bool) -> None:
        self.student = student
        self.weights = weights
        self.direction = direction
        self.prompt_ids = prompt_ids
        self.teacher_prompt_ids = teacher_prompt_ids
        self.pad_token_id = pad_token_id
        self.temperature = temperature
        self.device = device
        self.share_prompts = share_prompts

    def base(self) -> AbstractContextManager[nn.Module]:
        """The unsteered base model, in eval mode: the adapter disabled, or the frozen copy."""
        return adapters_disabled(self.weights.eval())

    @contextmanager
    def teacher(self, rows: Tensor | None = None) -> Iterator[nn.Module]:
        """The steered teacher, in eval mode: the base weights plus the direction.

        ``rows`` (bool [batch]) steers only those rows of every forward inside the block; the
        others see the plain base. An all-true batch takes the plain hook, an all-false one none.
        """
        with self.base() as base:
            if rows is not None and not rows.any():
                steering = nullcontext()
            else:
                steering = self.direction.steer(base, rows=None if rows is None or rows.all() else rows)
            with steering:
                yield base

    def _model(self, steer_mask: Tensor) -> AbstractContextManager[nn.Module]:
        """The teacher of rows with these flags: the per-row steered base, or with
        --teacher-system-prompt the plain base (the system prompt is in its prompt ids)."""
        return self.teacher(steer_mask) if self.teacher_prompt_ids is None else self.base()

    @contextmanager
    def for_rows(self, prompt_indices: Sequence[int],
                 steer_mask: Tensor) -> Iterator[tuple[nn.Module, Tensor, Tensor]]:
        """The teacher of these rows with its left-padded prompt ids and attention mask.

        By default the (per-row) steered base on the user prompts; with --teacher-system-prompt
        the unsteered base on the system-prompted prompts of the rows with ``steer_mask`` set, and on
        the user prompts of the others.
        """
        if self.teacher_prompt_ids is None:
            prompts = [self.prompt_ids[index] for index in prompt_indices]
        else:
            sources = [self.teacher_prompt_ids if flag else self.prompt_ids for flag in steer_mask.tolist()]
            prompts = [source[index] for source, index in zip(sources, prompt_indices, strict=True)]
        input_ids, attention_mask = left_pad(prompts, self.pad_token_id, self.device)
        with self._model(steer_mask) as model:
            yield model, input_ids, attention_mask

    def logits(self, rollout: Rollout, rows: slice, length: int) -> Tensor:
        """The teacher's temperature-scaled logits on the first ``length`` completion tokens of
        ``rollout``'s ``rows``, [rows, length, vocab], no gradient.

        The teacher reads its own prompt then the sampled tokens; position ids come from the mask,
        so its logits align position by position with the student's whatever the prompts' lengths.
        With ``share_prompts`` it reads each distinct prompt once for all of its rows.
        """
        start = rollout.prompt_length
        completions = rollout.sequences[rows, start:start + length]
        indices, steer_mask = rollout.prompt_indices[rows], rollout.steer_mask[rows]
        with torch.no_grad():
            if not self.share_prompts:
                with self.for_rows(indices, steer_mask) as (teacher, input_ids, mask):
                    return completion_logits(teacher, torch.cat([input_ids, completions], 1),
                                             torch.cat([mask, torch.ones_like(completions)], 1), length,
                                             self.temperature)
            starts, runs = prompt_groups(indices)
            runs = runs.to(self.device)
            prompts = [indices[row] for row in starts]
            with self.for_rows(prompts, steer_mask[starts]) as (teacher, input_ids, mask):
                first, cache = read_prompts(teacher, input_ids, mask, runs)
            with self._model(steer_mask) as teacher:
                return continue_prompts(teacher, first, cache, mask.index_select(0, runs), completions,
                                        self.temperature)
