"""Measured peaks (matmul throughput, copy bandwidth) and timing helpers for the benchmarks; the
machine's description is :mod:`griffon.machine`'s."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def best_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Minimum wall time of ``fn`` over ``repeats`` runs (the least disturbed by other processes)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def matmul_peak_flops(dtype: torch.dtype = torch.float32, n: int = 2048) -> float:
    """Measured matmul throughput (FLOP/s) of a large square product: this machine's practical peak."""
    a, b, c = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype), torch.empty(n, n, dtype=dtype)
    return 2 * n**3 / best_time(lambda: torch.mm(a, b, out=c), repeats=5)


def copy_bandwidth(nbytes: int = 512 * 2**20) -> float:
    """Measured memory bandwidth (bytes/s) of a large copy, counting bytes read plus bytes written."""
    src = torch.empty(nbytes // 4, dtype=torch.float32).normal_()
    dst = torch.empty_like(src)
    return 2 * nbytes / best_time(lambda: dst.copy_(src), repeats=5)
