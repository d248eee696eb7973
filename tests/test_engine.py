"""The engine helpers of stage 3 on one process: the accumulation window and its loss factor."""

from __future__ import annotations

import torch

from safesteer.distill.config import DistillConfig
from safesteer.distill.engine import make_accelerator, prepare_student, start_accumulation


def test_accumulation_window_syncs_on_its_last_micro_batch_only(tiny_model, tmp_path) -> None:
    accelerator = make_accelerator(DistillConfig(), tmp_path)
    synced = []
    for micro_batches in (3, 2, 1, 2):  # a window per optimizer step, whatever the previous one was
        assert start_accumulation(accelerator, micro_batches) == micro_batches  # one process
        for _ in range(micro_batches):
            with accelerator.accumulate(tiny_model):
                synced.append(accelerator.sync_gradients)
    assert synced == [False, False, True, False, True, True, False, True]


def test_backward_through_the_window_gives_the_plain_gradient(tiny_model, tmp_path) -> None:
    """accelerate divides each micro-batch's loss by the window; the factor undoes it exactly
    enough that the accumulated gradient is the sum of the micro-batches' own."""
    accelerator = make_accelerator(DistillConfig(), tmp_path)
    optimizer = torch.optim.SGD(tiny_model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model, _, _ = prepare_student(accelerator, tiny_model, optimizer, scheduler, 2)
    batches = [torch.tensor([[1, 5, 9, 12]]), torch.tensor([[1, 7, 3, 30]]), torch.tensor([[1, 40, 2, 8]])]
    scale = start_accumulation(accelerator, len(batches))
    for ids in batches:
        with accelerator.accumulate(model):
            accelerator.backward(model(input_ids=ids).logits.square().mean() * scale)
    accumulated = [p.grad.clone() for p in tiny_model.parameters()]
    tiny_model.zero_grad()
    for ids in batches:
        tiny_model(input_ids=ids).logits.square().mean().backward()
    for got, expected in zip(accumulated, (p.grad for p in tiny_model.parameters()), strict=True):
        torch.testing.assert_close(got, expected, atol=1e-7, rtol=1e-5)
