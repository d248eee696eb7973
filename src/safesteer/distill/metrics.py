"""What one distillation step measures, summed over micro-batches and processes.

Sums are kept as float64 scalar tensors on the training device while a step runs, so adding a
micro-batch's share never waits for the device, and they cross processes in one all-reduce
(:func:`sum_over_processes`, the trainer's only collective besides the gradients' own).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from accelerate import Accelerator
from torch import Tensor

from safesteer.divergence import log_softmax_at
from safesteer.keyword_judge import is_refusal


def sum_over_processes(accelerator: Accelerator, values: Tensor) -> Tensor:
    """``values`` summed element-wise over every process of the run (itself with one process)."""
    if accelerator.num_processes == 1:
        return values
    return accelerator.reduce(values.to(accelerator.device), reduction="sum").to(values.device)


def token_statistics(
    student_logits: Tensor, teacher_logits: Tensor, sampled_ids: Tensor,
    safety_token_ids: Tensor | None, chunk_size: int,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Per-token diagnostics, no gradient: k3 KL estimate and the probability mass on S.

    With y the sampled token, r = p_t(y)/p_s(y) and k3 = (r − 1) − log r, a non-negative estimate
    of KL(student‖teacher) (Schulman's k3), unbiased when y was drawn from exactly these
    (temperature-scaled) student logits, i.e. with --top-p 1. Logits are
    [batch, T, vocab], ``sampled_ids`` [batch, T]; returns [batch, T] float64 k3 and, when S is
    given, the student's and teacher's full-vocabulary mass Σ_{v∈S} p(v), each [batch, T].
    """
    index = sampled_ids.unsqueeze(-1)
    if safety_token_ids is not None:
        index = torch.cat([index, safety_token_ids.view(1, 1, -1).expand(*sampled_ids.shape, -1)], -1)
    student = log_softmax_at(student_logits.detach(), index, chunk_size).double()
    teacher = log_softmax_at(teacher_logits.detach(), index, chunk_size).double()
    log_ratio = teacher[..., 0] - student[..., 0]
    k3 = log_ratio.exp() - 1 - log_ratio
    if safety_token_ids is None:
        return k3, None, None
    return k3, student[..., 1:].logsumexp(-1).exp(), teacher[..., 1:].logsumexp(-1).exp()


@dataclass
class StepTotals:
    """One step's sums on this process (float64 scalars): the loss, token-weighted diagnostics
    over completion tokens, and counts over completions."""

    loss: Tensor
    kl_k3: Tensor
    student_mass_s: Tensor
    teacher_mass_s: Tensor
    completion_tokens: Tensor
    completions: Tensor
    refusals: Tensor
    truncated: Tensor
    steered: Tensor

    @classmethod
    def zeros(cls, device: torch.device) -> StepTotals:
        return cls(*(torch.zeros((), dtype=torch.float64, device=device) for _ in fields(cls)))

    def add_micro_batch(self, loss: Tensor, completion_mask: Tensor,
                        statistics: tuple[Tensor, Tensor | None, Tensor | None] | None) -> None:
        """One micro-batch's reduced loss and, weighted by its [rows, T] ``completion_mask``, its
        :func:`token_statistics` (None without a teacher)."""
        weights = completion_mask.double()
        self.loss += loss.detach().double()
        if statistics is not None:
            k3, student_mass, teacher_mass = statistics
            self.kl_k3 += (k3 * weights).sum()
            if student_mass is not None and teacher_mass is not None:
                self.student_mass_s += (student_mass * weights).sum()
                self.teacher_mass_s += (teacher_mass * weights).sum()
        self.completion_tokens += weights.sum()

    def count_completions(self, texts: Sequence[str], truncated: Tensor, steered: Tensor) -> None:
        """The step's completions on this process: how many, refused (keyword judge), truncated
        (bool [N], no EOS) and taught by the safety teacher (bool [N])."""
        self.completions.fill_(len(texts))
        self.refusals.fill_(sum(is_refusal(text) for text in texts))
        self.truncated.fill_(truncated.sum())
        self.steered.fill_(steered.sum())

    def metrics(self, accelerator: Accelerator, *, with_teacher: bool,
                with_safety_tokens: bool) -> dict[str, float]:
        """The step's global metrics, summed over processes: the loss, then per completion token
        the k3 KL and mass on S (with a teacher; the masses with S), then per completion."""
        local = torch.stack([getattr(self, field.name) for field in fields(self)])
        (loss, kl_k3, student_mass, teacher_mass, tokens, completions, refusals, truncated,
         steered) = sum_over_processes(accelerator, local).tolist()
        metrics = {"loss": loss}
        if with_teacher:
            metrics["kl_k3"] = kl_k3 / max(tokens, 1.0)
            if with_safety_tokens:
                metrics["student_mass_s"] = student_mass / max(tokens, 1.0)
                metrics["teacher_mass_s"] = teacher_mass / max(tokens, 1.0)
        metrics.update(refusal_rate=refusals / completions, completion_length=tokens / completions,
                       truncated=truncated / completions, steered_rows=steered / completions,
                       completion_tokens=tokens)
        return metrics
