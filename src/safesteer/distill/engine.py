"""The training engine of stage 3: accelerate's Accelerator, the prepared student and the
accumulation window of one optimizer step (docs/method.md §6.10).

``accelerate launch`` (or torchrun) with the user's config picks the engine: one process, DDP on
CPU (gloo) or GPU (NCCL), FSDP or DeepSpeed. Everything engine-specific the trainer needs is here.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn

from safesteer.distill.config import DistillConfig
from safesteer.models.precision import FrozenWeightCasts


def make_accelerator(config: DistillConfig, output_dir: str | Path) -> Accelerator:
    """The run's Accelerator, for one process or each of a launched run's.

    The trainer places the model itself (``--device`` with one process, the process's device with
    several), and the schedule counts optimizer steps, so accelerate neither moves the model nor
    steps the schedule once per process.
    """
    return Accelerator(log_with=None if config.report_to == "none" else config.report_to,
                       project_dir=str(output_dir), device_placement=False,
                       step_scheduler_with_optimizer=False)


def prepare_student(accelerator: Accelerator, student: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, micro_batch_size: int) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    """``accelerator.prepare`` of the student, its optimizer and schedule: the engine's wrappers."""
    deepspeed = accelerator.state.deepspeed_plugin
    key = "train_micro_batch_size_per_gpu"
    if deepspeed is not None and deepspeed.deepspeed_config.get(key) == "auto":
        # Without a dataloader DeepSpeed cannot infer it; it only enters its bookkeeping.
        deepspeed.deepspeed_config[key] = micro_batch_size
    return accelerator.prepare(student, optimizer, scheduler)


def start_accumulation(accelerator: Accelerator, micro_batches: int) -> float:
    """Open an accumulation window of ``micro_batches`` (``accelerator.accumulate`` then syncs on
    the last only); returns the factor each process's loss is backpropagated with.

    The engine averages gradients over the W processes, so W · (process's share of the step's
    loss) sums to the whole step's gradient. ``accelerator.backward`` divides by the window's
    length, except under DeepSpeed, whose engine divides by its own fixed one (1 in the example
    configs); the factor undoes that too.
    """
    accelerator.gradient_accumulation_steps, accelerator.step = micro_batches, 0
    window = 1 if accelerator.distributed_type == DistributedType.DEEPSPEED else micro_batches
    return float(accelerator.num_processes * window)


@contextmanager
def bf16_autocast(enabled: bool, device: torch.device, casts: FrozenWeightCasts | None,
                  model: nn.Module) -> Iterator[None]:
    """--bf16: bfloat16 products in a teacher-forced forward of ``model`` (docs/method.md §6.1);
    the backward follows the forward's dtypes and the gradients land in parameters of their own
    dtype. ``casts``, routed through ``model``'s linear layers, keeps the frozen weights' bfloat16
    copies from one forward to the next (not for weights FSDP or ZeRO-3 gather anew at every
    forward)."""
    if not enabled:
        yield
        return
    with torch.autocast(device.type, dtype=torch.bfloat16), casts.on(model) if casts else nullcontext():
        yield
