"""Per-token divergences between two models' next-token distributions, memory-bounded.

The SafeSteer objective (docs/method.md §6.2, the paper's Eq. 6) at completion position t is

    ℓ_t = Σ_{v∈S} p_s(v) · [log p_s(v) − log p_t(v)]

with p_s, p_t the student's and teacher's FULL-vocabulary softmax, summed over the safety tokens S
only, not renormalised, and with no gradient into the teacher.

Because only the mass on S is penalised, the per-token minimiser is p_s(v) = p_t(v)/e on S (the
complement absorbs the rest), where ℓ_t = −Σ_{v∈S} p_t(v)/e < 0 (docs/method.md §6.6). So this loss
can be negative, a safety token is pushed up only while p_s(v) < p_t(v)/e, and tokens outside S
still get gradient, −p_s(u)·G, through the softmax normaliser. Renormalising over S removes the
fixed point but makes the loss blind to how much mass the student puts on S.

``complement=True`` (this project's option, not the paper's; docs/method.md §6.8) adds the rest of
the vocabulary as one more outcome, log p(V∖S) = log(1 − Σ_{v∈S} p(v)), so the divergence is the KL
between the two models' (|S|+1)-outcome distributions. Its minimiser is p_s = p_t on S: the student
matches the teacher's safety-token probabilities, and the tokens outside S still move only as one
block (gradient ∝ p_s(u), a common factor), so their relative shape is left alone.

These are pure functions of logits, shared by training (the loss, :mod:`safesteer.distill.loss`
masks and reduces it) and evaluation (KL to the base, gold-answer NLL).
:func:`negative_log_likelihood` is the loss of the trainer's SFT baseline (no teacher term).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from safesteer.validation import token_ids_problem

VocabularyMode = Literal["full", "topk", "subset"]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for bf16/fp16 logits (small probabilities vanish in bf16), float64 kept as is."""
    return torch.promote_types(dtype, torch.float32)


def _seq_chunks(seq_len: int, chunk_size: int | None) -> list[slice]:
    """Slices of the seq dimension of at most ``chunk_size`` positions (one slice when None)."""
    if chunk_size is None or chunk_size >= seq_len:
        return [slice(None)]
    return [slice(start, start + chunk_size) for start in range(0, seq_len, chunk_size)]


def log_softmax_at(logits: Tensor, index: Tensor, chunk_size: int | None) -> Tensor:
    """Full-vocabulary log-softmax of ``logits`` [batch, seq, vocab], read only at ``index``.

    The logsumexp over the vocabulary runs in at least float32, ``chunk_size`` positions at a time,
    so no [batch, seq, vocab] float32 copy exists (docs/method.md §9.4). Returns [batch, seq, K] in the
    compute dtype.
    """
    dtype = _compute_dtype(logits.dtype)
    logsumexp = torch.cat(
        [
            torch.logsumexp(logits[:, chunk].to(dtype), dim=-1)
            for chunk in _seq_chunks(logits.shape[1], chunk_size)
        ],
        dim=1,
    )
    return logits.gather(-1, index).to(dtype) - logsumexp.unsqueeze(-1)


class _GatheredLogSoftmax(torch.autograd.Function):
    """``log_softmax_at`` for the student, with a chunked backward that recomputes the softmax.

    Plain autograd would save a float32 copy of bf16 logits and build several full-size
    temporaries in backward; this saves nothing new and allocates only the gradient.
    For output gradient g [batch, seq, K]: ∂/∂z_u = Σ_k g_k·1[u = index_k] − p(u)·Σ_k g_k.
    """

    @staticmethod
    def forward(ctx: Any, logits: Tensor, index: Tensor, chunk_size: int | None) -> Tensor:
        ctx.save_for_backward(logits, index)
        ctx.chunk_size = chunk_size
        return log_softmax_at(logits, index, chunk_size)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_logprobs: Tensor) -> tuple[Tensor, None, None]:
        logits, index = ctx.saved_tensors
        grad_logits = torch.empty_like(logits)
        for chunk in _seq_chunks(logits.shape[1], ctx.chunk_size):
            grad = grad_logprobs[:, chunk]
            probs = torch.softmax(logits[:, chunk], dim=-1, dtype=grad.dtype)
            probs.mul_(-grad.sum(-1, keepdim=True)).scatter_add_(-1, index[:, chunk], grad)
            grad_logits[:, chunk] = probs
        return grad_logits, None, None


def _log1mexp(log_mass: Tensor) -> Tensor:
    """log(1 − exp(x)) for x ≤ 0, stable at both ends; x is kept ≤ −1e-6 so a slice holding all of
    the mass gives a large finite negative log, not −inf (whose gradient would be NaN)."""
    x = log_mass.clamp(max=-1e-6)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _with_complement(logprobs: Tensor) -> Tensor:
    """Append log p(rest) = log(1 − Σ_slice p) to slice log-probabilities: [..., K] -> [..., K+1]."""
    return torch.cat([logprobs, _log1mexp(logprobs.logsumexp(-1, keepdim=True))], dim=-1)


def _kl_on_slice(logp: Tensor, logq: Tensor) -> Tensor:
    """Σ_v p(v)·[log p(v) − log q(v)] over the last dimension (the slice): [..., K] -> [...]."""
    return (logp.exp() * (logp - logq)).sum(-1)


def _slice_divergence(student: Tensor, teacher: Tensor, alpha: float) -> Tensor:
    """The α-family of docs/method.md §6.3 on slice log-probabilities [batch, seq, K] -> [batch, seq]."""
    if alpha == 1.0:
        return _kl_on_slice(student, teacher)
    if alpha == 0.0:
        return _kl_on_slice(teacher, student)
    mixture = torch.logaddexp(student + math.log(1.0 - alpha), teacher + math.log(alpha))
    return alpha * _kl_on_slice(teacher, mixture) + (1.0 - alpha) * _kl_on_slice(student, mixture)


def divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    mode: VocabularyMode = "subset",
    token_ids: Tensor | None = None,
    top_k: int | None = None,
    alpha: float = 1.0,
    renormalize: bool = False,
    complement: bool = False,
    chunk_size: int | None = None,
) -> Tensor:
    """Per-token student-teacher divergence over a vocabulary slice (docs/method.md §6.2–6.4).

    Args:
        student_logits: [batch, seq, vocab], any float dtype; gradients flow into it.
        teacher_logits: [batch, seq, vocab] on the same contexts; detached (no teacher gradient).
        mode: the slice the divergence is summed over: "subset" the fixed safety tokens
            ``token_ids`` (SafeSteer), "topk" the teacher's ``top_k`` most probable tokens at each
            position (ablation), "full" the whole vocabulary (standard on-policy distillation).
        token_ids: [K] distinct token ids of S; required for, and only for, mode "subset".
        top_k: K for mode "topk" only.
        alpha: 1 reverse KL Σ p_s·(log p_s − log p_t) (paper default); 0 forward KL
            Σ p_t·(log p_t − log p_s); 0 < α < 1 generalised JSD α·KL(p_t‖m) + (1−α)·KL(p_s‖m)
            with m = (1−α)·p_s + α·p_t built in log space. The JSD tends to 0, not to either KL,
            at the ends, so the three are separate choices rather than one continuous dial.
        renormalize: replace each model's log-probabilities on the slice by
            log p(v) − log Σ_{u∈slice} p(u) (off in the paper; not allowed with mode "full",
            where it would be the identity). Without it, p_s and p_t are full-vocabulary
            probabilities and the loss has the p_t/e fixed point described in the module docstring.
        complement: add the slice's complement as one outcome (mode "topk" or "subset", not with
            ``renormalize``): the divergence of the (K+1)-outcome distributions, minimised by
            p_s = p_t on the slice (see the module docstring). Off in the paper.
        chunk_size: positions per chunk along seq for the vocabulary-wide work, whose largest
            temporary is one [batch, chunk_size, vocab] float32 tensor; None = all at once.
            Results do not depend on it.

    Returns:
        [batch, seq] per-token loss in float32 (float64 for float64 logits), possibly negative;
        mask and reduce it with :func:`safesteer.distill.loss.loss_mask` and
        :func:`safesteer.distill.loss.reduce_loss`.

    For "subset" and "topk" only the logsumexp over the vocabulary is computed (in float32, per
    chunk) and the K slice entries gathered, so no full float32 log-probability tensor is made for
    either model, and backward allocates only the student's gradient (docs/method.md §9.4). "full" takes a
    float32 log-softmax of each chunk; chunking there bounds forward temporaries only.
    """
    if mode not in ("full", "topk", "subset"):
        raise ValueError(f"mode must be 'full', 'topk' or 'subset', got {mode!r}")
    if student_logits.dim() != 3 or student_logits.shape != teacher_logits.shape:
        raise ValueError(
            "student_logits and teacher_logits must both be [batch, seq, vocab], got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of positions, got {chunk_size}")
    if (token_ids is not None) != (mode == "subset"):
        raise ValueError(f"token_ids is required for mode 'subset' and only for it (mode {mode!r})")
    if complement and (mode == "full" or renormalize):
        raise ValueError("complement needs mode 'topk' or 'subset' and excludes renormalize (the "
                         "renormalised slice already sums to 1)")
    if (top_k is not None) != (mode == "topk"):
        raise ValueError(f"top_k is required for mode 'topk' and only for it (mode {mode!r})")
    batch, seq, vocab = student_logits.shape
    teacher_logits = teacher_logits.detach()

    if mode == "full":
        if renormalize:
            raise ValueError("renormalize needs mode 'topk' or 'subset'; over the full vocabulary "
                             "it would change nothing")
        dtype = _compute_dtype(student_logits.dtype)
        return torch.cat(
            [
                _slice_divergence(
                    torch.log_softmax(student_logits[:, chunk].to(dtype), dim=-1),
                    torch.log_softmax(teacher_logits[:, chunk].to(dtype), dim=-1),
                    alpha,
                )
                for chunk in _seq_chunks(seq, chunk_size)
            ],
            dim=1,
        )
    if mode == "subset":
        assert token_ids is not None
        if token_ids.dim() != 1 or token_ids.numel() == 0:
            raise ValueError(
                f"token_ids must be a non-empty 1-D tensor, got {tuple(token_ids.shape)}"
            )
        if problem := token_ids_problem(token_ids.tolist(), vocab):
            raise ValueError(f"token_{problem}")
        index = token_ids.to(student_logits.device).view(1, 1, -1).expand(batch, seq, -1)
    else:
        assert top_k is not None
        if not 1 <= top_k <= vocab:
            raise ValueError(f"top_k must lie in [1, {vocab}], got {top_k}")
        index = teacher_logits.topk(top_k, dim=-1).indices

    student = _GatheredLogSoftmax.apply(student_logits, index, chunk_size)
    teacher = log_softmax_at(teacher_logits, index, chunk_size)
    if renormalize:
        student = student - student.logsumexp(-1, keepdim=True)
        teacher = teacher - teacher.logsumexp(-1, keepdim=True)
    if complement:
        student, teacher = _with_complement(student), _with_complement(teacher)
    return _slice_divergence(student, teacher, alpha)


def negative_log_likelihood(logits: Tensor, token_ids: Tensor, *, chunk_size: int | None = None) -> Tensor:
    """Per-token −log p(y_t) of ``token_ids`` [batch, seq] under ``logits`` [batch, seq, vocab].

    The loss of SFT on a teacher's samples (the trainer's --mode sft baseline). Full-vocabulary
    softmax, computed like the student side of :func:`divergence` (chunked, no float32 copy of
    the logits kept for backward). Returns [batch, seq] in float32 (float64 for float64 logits).
    """
    if logits.dim() != 3 or token_ids.shape != logits.shape[:2]:
        raise ValueError(f"logits must be [batch, seq, vocab] and token_ids [batch, seq], got "
                         f"{tuple(logits.shape)} and {tuple(token_ids.shape)}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of positions, got {chunk_size}")
    return -_GatheredLogSoftmax.apply(logits, token_ids.unsqueeze(-1), chunk_size).squeeze(-1)
