"""Where the model runs: the device and dtype ``--device``/``--dtype`` name, and seeding that
device's sampling for a block without disturbing the caller's RNG."""

from __future__ import annotations

import resource
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from safesteer.errors import SafesteerError


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU; anything else must name a device this machine has."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise SafesteerError(f"--device {device!r} is not a torch device; use auto, cpu, cuda, cuda:1, "
                             "mps, ...") from error
    if resolved.type in ("cpu", "meta"):
        return resolved
    try:
        backend = torch.get_device_module(resolved.type)
        count = backend.device_count() if backend.is_available() else 0
    except (RuntimeError, AttributeError):
        count = 0
    if count == 0:
        raise SafesteerError(f"--device {device}: this machine has no {resolved.type} device; use "
                             "--device auto (accelerator if present, else cpu) or cpu")
    if resolved.index is not None and resolved.index >= count:
        raise SafesteerError(f"--device {device}: this machine has {count} {resolved.type} device(s), "
                             f"numbered 0..{count - 1}")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto``: float32 on CPU, bfloat16 on accelerators that support it, else float16.

    On a CPU, float32 keeps results independent of the CPU's bfloat16 support, which decides the
    speed: without AVX512-BF16 or AMX, a SmolLM2-135M training step took 1.7x and greedy generation
    1.3x as long in bfloat16; with AVX512-BF16 (a 2-core AMD EPYC) bfloat16 matmuls ran 4x as fast.
    Either is one flag away (``--dtype bfloat16``, or stage 3's ``--bf16``; docs/method.md §6.1).
    """
    if dtype != "auto":
        return getattr(torch, dtype)
    if device.type == "cpu":
        return torch.float32
    if device.type == "cuda":
        with torch.cuda.device(device):
            if torch.cuda.is_bf16_supported():
                return torch.bfloat16
    return torch.float16


@contextmanager
def seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Seed sampling on ``device`` for the block only; the caller's RNG states come back after."""
    if seed is None:
        yield
        return
    if device.type == "cpu":
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            yield
        return
    device_count = torch.get_device_module(device.type).device_count()
    with torch.random.fork_rng(devices=range(device_count), device_type=device.type):
        torch.manual_seed(seed)
        yield


def peak_memory_mib(device: torch.device) -> dict[str, float | None]:
    """This process's peak resident memory and, on CUDA, peak allocated GPU memory, in MiB."""
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    peak_gpu = round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None
    return {"peak_rss_mib": round(peak_rss, 1), "peak_gpu_mib": peak_gpu}
