"""Timing helpers shared by the benchmarks: one way to time a kernel, one way to summarise ranks."""

from __future__ import annotations

import statistics
import time

import torch


def bench_ms(fn, reps: int) -> float:
    """Median milliseconds of fn() after warm-up (CUDA events on GPU, wall clock on CPU)."""
    fn()
    fn()
    times = []
    for _ in range(reps):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def slowest_median(per_rank: list[list[float]]) -> float:
    """Per repetition the slowest rank (a collective ends when its last rank does), then the
    median over repetitions."""
    return statistics.median(max(rep) for rep in zip(*per_rank))
