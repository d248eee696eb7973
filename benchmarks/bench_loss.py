"""Peak memory and time of the chunked subset loss against a naive full-vocabulary version.

Every measurement is forward and backward of the SafeSteer loss (docs/method.md §6.2, summed over
tokens) in a fresh process. Memory is the peak resident set above the resident set once the logits
exist, the student's gradient included, measured with allocations of 1 MiB and more mmapped so
that freed tensors leave the resident set at once. Time is the median of a few repeats in another
fresh process with the default allocator. Linux/glibc only.

    python benchmarks/bench_loss.py --batch 4 --seq 512 --vocab 49152 --num-tokens 50
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import statistics
import time
from pathlib import Path

import torch
from torch import Tensor

from safesteer.divergence import divergence


def naive_subset_loss(student: Tensor, teacher: Tensor, ids: Tensor) -> Tensor:
    """Eq. 6 the direct way: full float32 log-softmax of both models, then index S."""
    student_logprobs = torch.log_softmax(student.float(), dim=-1)[..., ids]
    teacher_logprobs = torch.log_softmax(teacher.detach().float(), dim=-1)[..., ids]
    return (student_logprobs.exp() * (student_logprobs - teacher_logprobs)).sum(-1)


def resident_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(args: argparse.Namespace, chunk_size: int | None, dtype: str) -> tuple[float, float]:
    """(peak extra MiB, median seconds) of forward + backward in this (fresh) process.

    ``chunk_size`` None runs the naive version, a number the library's chunked one.
    """
    generator = torch.Generator().manual_seed(0)
    shape = (args.batch, args.seq, args.vocab)
    student = torch.randn(shape, generator=generator, dtype=getattr(torch, dtype))
    teacher = torch.randn(shape, generator=generator, dtype=getattr(torch, dtype))
    student.requires_grad_(True)
    ids = torch.randperm(args.vocab, generator=generator)[: args.num_tokens]
    baseline = resident_bytes()
    seconds = []
    for _ in range(args.repeats):
        student.grad = None
        start = time.perf_counter()
        if chunk_size is None:
            loss = naive_subset_loss(student, teacher, ids)
        else:
            loss = divergence(student, teacher, token_ids=ids, chunk_size=chunk_size)
        loss.sum().backward()
        seconds.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return (peak - baseline) / 2**20, statistics.median(seconds)


def run_fresh(args: argparse.Namespace, chunk_size: int | None, dtype: str, value: str) -> float:
    """``measure`` in a new process; value "memory" (MiB, small allocations mmapped) or "time"."""
    if value == "memory":
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(2**20)
    else:
        os.environ.pop("MALLOC_MMAP_THRESHOLD_", None)
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        peak, seconds = pool.apply(measure, (args, chunk_size, dtype))
    return peak if value == "memory" else seconds


def check_agreement(args: argparse.Namespace) -> float:
    """Largest |difference| of the two per-token losses on a small float32 slice of the shape."""
    generator = torch.Generator().manual_seed(1)
    student = torch.randn(2, 8, args.vocab, generator=generator)
    teacher = torch.randn(2, 8, args.vocab, generator=generator)
    ids = torch.randperm(args.vocab, generator=generator)[: args.num_tokens]
    chunked = divergence(student, teacher, token_ids=ids, chunk_size=3)
    return float((chunked - naive_subset_loss(student, teacher, ids)).abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--num-tokens", type=int, default=50, help="|S|")
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=[8, 64],
                        help="positions per chunk, one run each")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    args = parser.parse_args()

    logits_mib = args.batch * args.seq * args.vocab * 4 / 2**20
    print(f"[{args.batch}, {args.seq}, {args.vocab}] logits, |S| = {args.num_tokens}, "
          f"{torch.get_num_threads()} threads; one float32 [batch, seq, vocab] tensor = "
          f"{logits_mib:.0f} MiB")
    print(f"max |chunked - naive| per-token loss: {check_agreement(args):.2e}")
    print(f"{'dtype':>9} {'version':>9} {'peak MiB':>9} {'seconds':>8} "
          f"{'naive/this memory':>18} {'naive/this time':>16}")
    for dtype in args.dtypes:
        naive_peak = run_fresh(args, None, dtype, "memory")
        naive_time = run_fresh(args, None, dtype, "time")
        print(f"{dtype:>9} {'naive':>9} {naive_peak:9.0f} {naive_time:8.3f}")
        for chunk_size in args.chunk_sizes:
            peak = run_fresh(args, chunk_size, dtype, "memory")
            seconds = run_fresh(args, chunk_size, dtype, "time")
            print(f"{dtype:>9} {f'chunk {chunk_size}':>9} {peak:9.0f} {seconds:8.3f} "
                  f"{naive_peak / peak:18.2f} {naive_time / seconds:16.2f}")


if __name__ == "__main__":
    main()
