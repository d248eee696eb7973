"""Peak memory and time of the chunked subset loss against a naive full-vocabulary version.

Each measurement (forward and backward of the SafeSteer loss, summed over tokens) runs in a fresh
process, so peak resident memory is that run's alone; the figure reported is the peak above the
resident memory once the logits exist. Linux only (reads /proc/self/statm).

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

from safesteer.distill.loss import divergence


def naive_subset_loss(student: Tensor, teacher: Tensor, ids: Tensor) -> Tensor:
    """Eq. 6 the direct way: full float32 log-softmax of both models, then index S."""
    student_logprobs = torch.log_softmax(student.float(), dim=-1)[..., ids]
    teacher_logprobs = torch.log_softmax(teacher.detach().float(), dim=-1)[..., ids]
    return (student_logprobs.exp() * (student_logprobs - teacher_logprobs)).sum(-1)


def resident_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(args: argparse.Namespace, implementation: str, dtype: str) -> tuple[float, float]:
    """(peak extra MiB, median seconds) of forward + backward in this (fresh) process."""
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
        if implementation == "naive":
            loss = naive_subset_loss(student, teacher, ids)
        else:
            loss = divergence(student, teacher, token_ids=ids, chunk_size=args.chunk_size)
        loss.sum().backward()
        seconds.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return (peak - baseline) / 2**20, statistics.median(seconds)


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
    parser.add_argument("--chunk-size", type=int, default=64, help="positions per chunk")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    args = parser.parse_args()

    logits_mib = args.batch * args.seq * args.vocab * 4 / 2**20
    print(f"[{args.batch}, {args.seq}, {args.vocab}] logits, |S| = {args.num_tokens}, "
          f"chunk {args.chunk_size}, {torch.get_num_threads()} threads; one float32 "
          f"[batch, seq, vocab] tensor = {logits_mib:.0f} MiB")
    print(f"max |chunked - naive| per-token loss: {check_agreement(args):.2e}")
    print(f"{'dtype':>9} {'implementation':>15} {'peak MiB':>9} {'seconds':>8}")
    context = multiprocessing.get_context("spawn")
    with context.Pool(1, maxtasksperchild=1) as pool:
        for dtype in args.dtypes:
            results = {}
            for implementation in ("naive", "chunked"):
                results[implementation] = pool.apply(measure, (args, implementation, dtype))
                peak, seconds = results[implementation]
                print(f"{dtype:>9} {implementation:>15} {peak:9.0f} {seconds:8.3f}")
            (naive_peak, naive_time), (chunked_peak, chunked_time) = results.values()
            print(f"{dtype:>9} {'naive / chunked':>15} {naive_peak / chunked_peak:9.2f} "
                  f"{naive_time / chunked_time:8.2f}")


if __name__ == "__main__":
    main()
