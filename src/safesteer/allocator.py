"""The process's heap: freed memory kept for reuse, and oneDNN's kernel caches bounded.

**Freed memory kept for reuse**: glibc's allocator told not to hand large blocks back to the system.

On a CPU every step allocates and frees tensors of tens of megabytes (logits over the vocabulary,
folded and bfloat16 copies of the weights). glibc serves blocks from 128 KiB up (32 MiB at most,
as its threshold adapts) with fresh ``mmap`` pages and unmaps them when freed, so each step pays
the kernel to fault the same memory in again. With ``mmap`` off and a high trim threshold, freed
blocks stay in the process heap and the next step reuses them: on the embedded default a demo
step ran 1.31x as fast with a third of the system CPU time, for 1.01x the peak resident memory
(``benchmarks/bench_allocator.py``); ``benchmarks/bench_step.py --bf16``'s step, about 1.06x as
fast for 1.09-1.18x the peak (docs/method.md §6.1). Results are bitwise the same: only where the
bytes live changes.

**Kernel caches bounded**: on a CPU, PyTorch computes bfloat16 products with oneDNN, which
compiles a kernel for each product shape and keeps it, in its own cache and in PyTorch's wrapper's
(ideep), up to 1024 shapes each, about half a MiB a shape here. Stage 3's shapes change at every
step (the completions' lengths do), and the evaluation's with every batch's prompt length, so the
heap grew with every step until the caches were full: 106 MiB over 25 steps of 4 prompts x 4
samples x 32 tokens under ``--bf16``.
:func:`bound_kernel_caches` keeps 256 shapes each, more than a step's products use, at the same
speed (docs/method.md §6.1).

The ``safesteer`` command calls :func:`keep_freed_memory` and :func:`bound_kernel_caches` once at
start; a library user may too.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

logger = logging.getLogger(__name__)

# mallopt(3) parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4
_SETTINGS = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**30), (_M_TOP_PAD, 64 * 2**20))

# The capacities of oneDNN's primitive cache and of ideep's, read at their first use.
KERNEL_CACHES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")
KERNEL_CACHE_CAPACITY = 256


def tunes_allocator(name: str, value: str) -> bool:
    """Whether the environment variable ``name=value`` tunes or replaces the allocator, or asks
    for the system's behaviour (``SAFESTEER_SYSTEM_MALLOC=1``): any such leaves it alone."""
    return (name.startswith("MALLOC_") or (name == "LD_PRELOAD" and bool(value))
            or (name == "SAFESTEER_SYSTEM_MALLOC" and value == "1"))


def keep_freed_memory() -> bool:
    """Set glibc's allocator to reuse freed blocks (module docstring); True if it was set.

    Left alone where the allocator is not glibc's, and where the environment tunes it
    (:func:`tunes_allocator`: any ``MALLOC_*`` variable, another allocator in ``LD_PRELOAD``, such
    as jemalloc or tcmalloc, or ``SAFESTEER_SYSTEM_MALLOC=1``).
    """
    if any(tunes_allocator(name, value) for name, value in os.environ.items()):
        return False
    if not sys.platform.startswith("linux"):
        return False  # macOS, Windows: another allocator
    libc = ctypes.CDLL(None)  # the symbols the process already has, libc's among them
    if not hasattr(libc, "gnu_get_libc_version"):
        return False  # musl
    applied = all(libc.mallopt(parameter, value) == 1 for parameter, value in _SETTINGS)
    if not applied:
        logger.debug("mallopt refused a setting; the allocator keeps its defaults for it")
    return applied


def bound_kernel_caches(capacity: int = KERNEL_CACHE_CAPACITY) -> list[str]:
    """Keep at most ``capacity`` compiled product kernels in each of oneDNN's caches (module
    docstring); returns the variables it set. Those the environment sets are left alone. It must
    run before the process's first oneDNN product: the caches read their capacity then."""
    unset = [name for name in KERNEL_CACHES if name not in os.environ]
    for name in unset:
        os.environ[name] = str(capacity)
    return unset
