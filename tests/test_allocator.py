"""safesteer.allocator: glibc told to keep freed blocks, unless the process tunes its allocator."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import pytest

from safesteer.allocator import KERNEL_CACHES, bound_kernel_caches, keep_freed_memory, tunes_allocator

GLIBC = sys.platform.startswith("linux") and hasattr(ctypes.CDLL(None), "gnu_get_libc_version")


def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in list(os.environ.items()):
        if tunes_allocator(name, value):
            monkeypatch.delenv(name)


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt only")
def test_glibc_is_told_to_keep_freed_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    _clean_environment(monkeypatch)
    assert keep_freed_memory()


@pytest.mark.parametrize("name, value", [("SAFESTEER_SYSTEM_MALLOC", "1"), ("MALLOC_ARENA_MAX", "2"),
                                         ("LD_PRELOAD", "libjemalloc.so.2")])
def test_an_allocator_the_process_tunes_is_left_alone(monkeypatch: pytest.MonkeyPatch, name: str,
                                                      value: str) -> None:
    _clean_environment(monkeypatch)
    monkeypatch.setenv(name, value)
    assert not keep_freed_memory()


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt only")
def test_freed_large_blocks_are_reused_instead_of_faulted_in_again() -> None:
    """The point of it: a process that allocates eight 32 MiB tensors, frees them and does it again
    faults their pages in every round by default, and after a round or two no more with the
    setting (the page faults of rounds 3 and 4 are counted)."""
    script = (
        "import resource, sys, torch\n"
        "from safesteer.allocator import keep_freed_memory, tunes_allocator\n"
        "if sys.argv[1] == 'keep': assert keep_freed_memory()\n"
        "def faults(): return resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "for _ in range(2): tensors = [torch.ones(2**23) for _ in range(8)]; del tensors\n"
        "before = faults()\n"
        "for _ in range(2): tensors = [torch.ones(2**23) for _ in range(8)]; del tensors\n"
        "print(faults() - before)\n")
    environment = {name: value for name, value in os.environ.items() if not tunes_allocator(name, value)}
    faults = {mode: int(subprocess.run([sys.executable, "-c", script, mode], env=environment, check=True,
                                       capture_output=True, text=True).stdout)
              for mode in ("keep", "system")}
    pages = 2 * 8 * 2**25 // os.sysconf("SC_PAGE_SIZE")
    assert faults["system"] > pages // 2
    assert faults["keep"] < faults["system"] // 4


def test_kernel_caches_are_bounded_unless_the_environment_sets_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "2048")
    assert bound_kernel_caches(64) == ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"]
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "64"
    assert os.environ["LRU_CACHE_CAPACITY"] == "2048"


@pytest.mark.skipif(not GLIBC, reason="glibc's mallinfo2 counts the heap in use")
def test_bounded_kernel_caches_stop_the_heap_growing_with_each_new_product_shape() -> None:
    """The point of it: bfloat16 products of 400 new shapes grow the heap in use by about half a
    MiB each by default (oneDNN keeps a kernel per shape) and by nothing once the caches are
    full at a bound of 16 shapes."""
    script = (
        "import ctypes, sys, torch\n"
        "from safesteer.allocator import bound_kernel_caches\n"
        "if sys.argv[1] == 'bound': bound_kernel_caches(16)\n"
        "class Info(ctypes.Structure):  # struct mallinfo2: e = hblkhd (mapped), h = uordblks (heap in use)\n"
        "    _fields_ = [(name, ctypes.c_size_t) for name in 'abcdefghij']\n"
        "libc = ctypes.CDLL(None); libc.mallinfo2.restype = Info\n"
        "def in_use(): info = libc.mallinfo2(); return info.h + info.e\n"
        "weight = torch.randn(64, 64, dtype=torch.bfloat16)\n"
        "for rows in range(1, 601):\n"
        "    torch.nn.functional.linear(torch.randn(rows, 64, dtype=torch.bfloat16), weight)\n"
        "    if rows == 200: before = in_use()\n"
        "print(in_use() - before)\n")
    environment = {name: value for name, value in os.environ.items() if name not in KERNEL_CACHES}
    growth = {mode: int(subprocess.run([sys.executable, "-c", script, mode], env=environment, check=True,
                                       capture_output=True, text=True).stdout)
              for mode in ("bound", "default")}
    assert growth["default"] > 20 * 2**20  # the pinned CPU torch keeps a kernel per shape
    assert growth["bound"] < growth["default"] // 10
