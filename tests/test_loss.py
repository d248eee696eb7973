"""The stage-3 loss pinned against naive float64 references written from docs/method.md §6."""

import math

import pytest
import torch

from safesteer.distill.loss import loss_mask, reduce_loss
from safesteer.divergence import divergence, negative_log_likelihood

BATCH, SEQ, VOCAB = 2, 5, 11
SAFETY_IDS = [1, 4, 7, 8]
TOP_K = 3
MODES = ["full", "topk", "subset"]
ALPHAS = [0.0, 0.3, 1.0]
# Renormalising over the full vocabulary is rejected, so "full" runs without it only; the
# complement outcome needs a slice and excludes renormalisation.
MODE_RENORMALIZE = [(m, r) for m in MODES for r in (False, True) if not (m == "full" and r)]
MODE_RENORMALIZE_COMPLEMENT = [(m, r, False) for m, r in MODE_RENORMALIZE] + [
    ("topk", False, True), ("subset", False, True)]


def slice_options(mode: str) -> dict:
    if mode == "subset":
        return {"token_ids": torch.tensor(SAFETY_IDS)}
    if mode == "topk":
        return {"top_k": TOP_K}
    return {}


def naive_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mode: str,
    alpha: float,
    renormalize: bool,
    complement: bool = False,
) -> torch.Tensor:
    """Position by position, full softmax in float64, the formulas of docs/method.md §6.2–6.4; with
    ``complement`` the rest of the vocabulary is one more outcome, 1 − Σ_slice p."""
    rows = []
    for b in range(student_logits.shape[0]):
        row = []
        for t in range(student_logits.shape[1]):
            p_student = torch.softmax(student_logits[b, t].double(), dim=0)
            p_teacher = torch.softmax(teacher_logits[b, t].double().detach(), dim=0)
            if mode == "subset":
                ids = SAFETY_IDS
            elif mode == "topk":
                ids = sorted(range(len(p_teacher)), key=lambda v: -p_teacher[v].item())[:TOP_K]
            else:
                ids = list(range(len(p_teacher)))
            p, q = p_student[ids], p_teacher[ids]
            if renormalize:
                p, q = p / p.sum(), q / q.sum()
            if complement:
                p = torch.cat([p, (1 - p.sum()).view(1)])
                q = torch.cat([q, (1 - q.sum()).view(1)])
            if alpha == 1.0:
                value = (p * (p.log() - q.log())).sum()
            elif alpha == 0.0:
                value = (q * (q.log() - p.log())).sum()
            else:
                m = (1 - alpha) * p + alpha * q
                value = alpha * (q * (q / m).log()).sum() + (1 - alpha) * (p * (p / m).log()).sum()
            row.append(value)
        rows.append(torch.stack(row))
    return torch.stack(rows)


@pytest.fixture
def logits() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    student = 2 * torch.randn(BATCH, SEQ, VOCAB, generator=generator, dtype=torch.float64)
    teacher = 2 * torch.randn(BATCH, SEQ, VOCAB, generator=generator, dtype=torch.float64)
    return student, teacher


@pytest.mark.parametrize(("mode", "renormalize", "complement"), MODE_RENORMALIZE_COMPLEMENT)
@pytest.mark.parametrize("alpha", ALPHAS)
def test_divergence_matches_naive_reference_value_and_gradient(mode, alpha, renormalize, complement,
                                                               logits):
    student, teacher = logits
    student_a = student.clone().requires_grad_(True)
    student_b = student.clone().requires_grad_(True)
    weights = torch.randn(BATCH, SEQ, dtype=torch.float64)

    loss = divergence(student_a, teacher, mode=mode, alpha=alpha, renormalize=renormalize,
                      complement=complement, **slice_options(mode))
    expected = naive_divergence(student_b, teacher, mode, alpha, renormalize, complement)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)

    (loss * weights).sum().backward()
    (expected * weights).sum().backward()
    torch.testing.assert_close(student_a.grad, student_b.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("mode", ["topk", "subset"])
@pytest.mark.parametrize("alpha", ALPHAS)
def test_renormalize_takes_effect(mode, alpha, logits):
    student, teacher = logits
    plain = divergence(student, teacher, mode=mode, alpha=alpha, **slice_options(mode))
    renormalized = divergence(student, teacher, mode=mode, alpha=alpha, renormalize=True,
                              **slice_options(mode))
    assert (plain - renormalized).abs().min() > 1e-4


def test_subset_uses_full_vocabulary_probabilities(logits):
    """Moving student mass off S changes the plain loss but not the renormalised one (§6.6.3)."""
    student, teacher = logits
    outside = torch.ones(VOCAB, dtype=torch.bool)
    outside[SAFETY_IDS] = False
    shifted = student + 1.5 * outside
    ids = torch.tensor(SAFETY_IDS)
    p_s = torch.softmax(student, -1)[..., SAFETY_IDS]
    p_t = torch.softmax(teacher, -1)[..., SAFETY_IDS]
    by_formula = (p_s * (p_s.log() - p_t.log())).sum(-1)

    torch.testing.assert_close(divergence(student, teacher, token_ids=ids), by_formula)
    assert (divergence(shifted, teacher, token_ids=ids) - by_formula).abs().min() > 1e-3
    torch.testing.assert_close(
        divergence(shifted, teacher, token_ids=ids, renormalize=True),
        divergence(student, teacher, token_ids=ids, renormalize=True),
    )


def test_gradient_facts_of_method_6_6(logits):
    """∂ℓ/∂z_u = −p_s(u)·G off S and p_s(w)·c_w − p_s(w)·G on S, with G = Σ_S p_s·c."""
    student, teacher = logits
    student = student.clone().requires_grad_(True)
    divergence(student, teacher, token_ids=torch.tensor(SAFETY_IDS)).sum().backward()

    p_s = torch.softmax(student.detach(), -1)
    p_t = torch.softmax(teacher, -1)
    in_s = torch.zeros(VOCAB, dtype=torch.bool)
    in_s[SAFETY_IDS] = True
    c = (p_s / p_t).log() + 1
    g = (p_s * c * in_s).sum(-1, keepdim=True)
    expected = torch.where(in_s, p_s * c - p_s * g, -p_s * g)
    torch.testing.assert_close(student.grad, expected, rtol=1e-10, atol=1e-12)
    assert student.grad[..., ~in_s].abs().min() > 0


def test_fixed_point_is_teacher_over_e_on_subset(logits):
    """At p_s = p_t/e on S every c_v is 0, so the gradient vanishes and ℓ = −Σ_S p_t/e < 0."""
    _, teacher = logits
    ids = torch.tensor(SAFETY_IDS)
    p_t = torch.softmax(teacher, -1)
    generator = torch.Generator().manual_seed(1)
    p_s = torch.rand(BATCH, SEQ, VOCAB, dtype=torch.float64, generator=generator)
    p_s[..., ids] = 0
    rest = 1 - (p_t[..., ids] / math.e).sum(-1, keepdim=True)
    p_s = p_s / p_s.sum(-1, keepdim=True) * rest
    p_s[..., ids] = p_t[..., ids] / math.e
    student = p_s.log().requires_grad_(True)

    loss = divergence(student, teacher, token_ids=ids)
    loss.sum().backward()
    torch.testing.assert_close(loss, -(p_t[..., ids] / math.e).sum(-1))
    assert (loss < 0).all()
    torch.testing.assert_close(student.grad, torch.zeros_like(student.grad), rtol=0, atol=1e-12)


def test_complement_fixed_point_is_the_teacher_on_subset(logits):
    """With the rest as one outcome, p_s = p_t on S is a zero of the loss and of its gradient,
    whatever shape the student gives the tokens outside S."""
    _, teacher = logits
    ids = torch.tensor(SAFETY_IDS)
    p_t = torch.softmax(teacher, -1)
    p_s = torch.rand(BATCH, SEQ, VOCAB, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    p_s[..., ids] = 0
    p_s = p_s / p_s.sum(-1, keepdim=True) * (1 - p_t[..., ids].sum(-1, keepdim=True))
    p_s[..., ids] = p_t[..., ids]
    student = p_s.log().requires_grad_(True)

    loss = divergence(student, teacher, token_ids=ids, complement=True)
    loss.sum().backward()
    torch.testing.assert_close(loss, torch.zeros_like(loss), rtol=0, atol=1e-12)
    torch.testing.assert_close(student.grad, torch.zeros_like(student.grad), rtol=0, atol=1e-12)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_complement_moves_tokens_outside_s_as_one_block(alpha, logits):
    """Off S the gradient is p_s(u) times one factor per position: their relative shape is kept."""
    student, teacher = logits
    student = student.clone().requires_grad_(True)
    divergence(student, teacher, token_ids=torch.tensor(SAFETY_IDS), alpha=alpha,
               complement=True).sum().backward()
    outside = [v for v in range(VOCAB) if v not in SAFETY_IDS]
    ratio = student.grad[..., outside] / torch.softmax(student.detach(), -1)[..., outside]
    torch.testing.assert_close(ratio, ratio[..., :1].expand_as(ratio), rtol=1e-9, atol=1e-12)
    assert ratio.abs().min() > 0


@pytest.mark.parametrize(("complement", "scale"), [(False, 1 / math.e), (True, 1.0)])
def test_gradient_descent_converges_to_the_minimiser(complement, scale):
    """The paper's loss drives p_s to p_t/e on S; with the complement outcome, to p_t."""
    generator = torch.Generator().manual_seed(2)
    teacher = torch.randn(1, 1, 6, generator=generator, dtype=torch.float64)
    student = torch.zeros(1, 1, 6, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([0, 2, 3])
    optimizer = torch.optim.Adam([student], lr=0.05)
    for _ in range(1500):
        optimizer.zero_grad()
        divergence(student, teacher, token_ids=ids, complement=complement).sum().backward()
        optimizer.step()
    p_s = torch.softmax(student.detach(), -1)[0, 0, ids]
    p_t = torch.softmax(teacher, -1)[0, 0, ids]
    torch.testing.assert_close(p_s, p_t * scale, rtol=1e-4, atol=1e-6)


def test_complement_of_a_slice_holding_all_mass_stays_finite():
    student = torch.tensor([[[40.0, -40.0, -40.0]]], dtype=torch.float64, requires_grad=True)
    teacher = torch.tensor([[[0.0, 1.0, 2.0]]], dtype=torch.float64)
    for alpha in ALPHAS:
        loss = divergence(student, teacher, token_ids=torch.tensor([0]), alpha=alpha, complement=True)
        (grad,) = torch.autograd.grad(loss.sum(), student)
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()


@pytest.mark.parametrize("mode", MODES)
def test_teacher_gets_no_gradient(mode, logits):
    student, teacher = (x.clone().requires_grad_(True) for x in logits)
    divergence(student, teacher, mode=mode, alpha=0.3, **slice_options(mode)).sum().backward()
    assert teacher.grad is None
    assert student.grad is not None


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("alpha", ALPHAS)
def test_bfloat16_logits_are_computed_in_float32(mode, alpha, logits):
    student_bf16 = logits[0].to(torch.bfloat16).requires_grad_(True)
    teacher_bf16 = logits[1].to(torch.bfloat16)
    student_fp32 = student_bf16.detach().float().requires_grad_(True)

    options = {"mode": mode, "alpha": alpha, **slice_options(mode)}
    loss_bf16 = divergence(student_bf16, teacher_bf16, **options)
    loss_fp32 = divergence(student_fp32, teacher_bf16.float(), **options)
    assert loss_bf16.dtype == torch.float32
    torch.testing.assert_close(loss_bf16, loss_fp32, rtol=1e-5, atol=1e-6)
    loss_bf16.sum().backward()
    loss_fp32.sum().backward()
    assert student_bf16.grad.dtype == torch.bfloat16
    torch.testing.assert_close(student_bf16.grad.float(), student_fp32.grad, rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize(("mode", "renormalize"), MODE_RENORMALIZE)
@pytest.mark.parametrize("chunk_size", [1, 2, 3, 100])
def test_chunked_equals_unchunked(mode, renormalize, chunk_size, logits):
    student, teacher = logits
    options = {"mode": mode, "alpha": 0.3, "renormalize": renormalize, **slice_options(mode)}
    whole = student.clone().requires_grad_(True)
    chunked = student.clone().requires_grad_(True)
    expected = divergence(whole, teacher, **options)
    loss = divergence(chunked, teacher, chunk_size=chunk_size, **options)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-14)
    expected.sum().backward()
    loss.sum().backward()
    torch.testing.assert_close(chunked.grad, whole.grad, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    "options",
    [
        {"mode": "subset"},
        {"mode": "subset", "token_ids": torch.tensor([1, 1])},
        {"mode": "subset", "token_ids": torch.tensor([VOCAB])},
        {"mode": "subset", "token_ids": torch.tensor([1]), "top_k": 2},
        {"mode": "topk"},
        {"mode": "topk", "top_k": VOCAB + 1},
        {"mode": "full", "renormalize": True},
        {"mode": "full", "complement": True},
        {"mode": "subset", "token_ids": torch.tensor([1]), "renormalize": True, "complement": True},
        {"mode": "vocab"},
        {"mode": "full", "alpha": 1.5},
        {"mode": "full", "chunk_size": 0},
    ],
)
def test_divergence_rejects_bad_options(options, logits):
    with pytest.raises(ValueError):
        divergence(*logits, **options)


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_negative_log_likelihood_matches_naive_reference_value_and_gradient(chunk_size, logits):
    student = logits[0]
    tokens = torch.randint(VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(5))
    student_a = student.clone().requires_grad_(True)
    student_b = student.clone().requires_grad_(True)
    weights = torch.randn(BATCH, SEQ, dtype=torch.float64)

    loss = negative_log_likelihood(student_a, tokens, chunk_size=chunk_size)
    expected = torch.stack([torch.stack([-torch.log(torch.softmax(student_b[b, t], 0)[tokens[b, t]])
                                         for t in range(SEQ)]) for b in range(BATCH)])
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    (loss * weights).sum().backward()
    (expected * weights).sum().backward()
    torch.testing.assert_close(student_a.grad, student_b.grad, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError):
        negative_log_likelihood(student, tokens[:, 1:])


def test_token_reduction_is_invariant_to_micro_batch_split():
    generator = torch.Generator().manual_seed(3)
    per_token = torch.randn(6, 9, generator=generator, dtype=torch.float64)
    mask = torch.rand(6, 9, generator=generator) < 0.6
    mask[2] = False
    total_tokens = float(mask.sum())
    whole = reduce_loss(per_token, mask, reduction="token", num_items_in_step=total_tokens)
    torch.testing.assert_close(whole, per_token[mask].sum() / total_tokens)
    for sizes in ([1] * 6, [2, 1, 3], [5, 1]):
        pieces = zip(per_token.split(sizes), mask.split(sizes), strict=True)
        split = sum(reduce_loss(loss, m, num_items_in_step=total_tokens) for loss, m in pieces)
        torch.testing.assert_close(split, whole)


def test_sequence_reduction_is_mean_of_per_completion_means():
    generator = torch.Generator().manual_seed(4)
    per_token = torch.randn(5, 8, generator=generator, dtype=torch.float64)
    mask = torch.rand(5, 8, generator=generator) < 0.5
    mask[:, 0] = True
    means = [per_token[i][mask[i]].mean() for i in range(5)]
    expected = sum(means) / 5
    for sizes in ([5], [1] * 5, [2, 3]):
        pieces = zip(per_token.split(sizes), mask.split(sizes), strict=True)
        split = sum(
            reduce_loss(loss, m, reduction="sequence", num_items_in_step=5) for loss, m in pieces
        )
        torch.testing.assert_close(split, expected)


@pytest.mark.parametrize("reduction", ["token", "sequence"])
def test_empty_completion_contributes_zero_without_nan(reduction):
    nan, inf = float("nan"), float("inf")
    per_token = torch.tensor([[1.0, 2.0, 3.0], [nan, inf, 5.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    loss = reduce_loss(per_token, mask, reduction=reduction, num_items_in_step=2)
    expected = 3.0 / 2 if reduction == "token" else 1.5 / 2
    assert loss.item() == pytest.approx(expected)
    loss.backward()
    assert torch.isfinite(per_token.grad).all()
    assert (per_token.grad[1] == 0).all()


def test_reduce_loss_rejects_bad_arguments():
    with pytest.raises(ValueError):
        reduce_loss(torch.zeros(2, 3), torch.ones(2, 3), num_items_in_step=0)
    with pytest.raises(ValueError):
        reduce_loss(torch.zeros(2, 3), torch.ones(2, 3), reduction="mean", num_items_in_step=1)
    with pytest.raises(ValueError):
        reduce_loss(torch.zeros(2, 3), torch.ones(3, 2), num_items_in_step=1)


COMPLETIONS = torch.tensor(
    [
        [0, 0, 1, 1, 1, 1, 1, 0],  # left offset 2, right padding
        [1, 1, 1, 1, 0, 0, 0, 0],  # no offset
        [0, 0, 0, 0, 0, 1, 1, 1],  # left offset 5
        [0, 0, 0, 0, 0, 0, 0, 0],  # empty
    ]
)


def test_loss_mask_counts_from_each_completion_start():
    assert torch.equal(loss_mask(COMPLETIONS), COMPLETIONS)
    assert loss_mask(COMPLETIONS, skip=1, keep=3).tolist() == [
        [0, 0, 0, 1, 1, 0, 0, 0],
        [0, 1, 1, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 1, 1],
        [0, 0, 0, 0, 0, 0, 0, 0],
    ]
    assert loss_mask(COMPLETIONS.bool(), skip=2).tolist() == [
        [False] * 4 + [True] * 3 + [False],
        [False] * 2 + [True] * 2 + [False] * 4,
        [False] * 7 + [True],
        [False] * 8,
    ]
    assert loss_mask(COMPLETIONS, keep=2).sum(1).tolist() == [2, 2, 2, 0]


@pytest.mark.parametrize(("skip", "keep"), [(2, 2), (3, 1), (-1, 0), (0, -1)])
def test_loss_mask_rejects_bad_windows(skip, keep):
    with pytest.raises(ValueError):
        loss_mask(COMPLETIONS, skip=skip, keep=keep)
