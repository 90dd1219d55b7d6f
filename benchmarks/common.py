"""The benchmark scripts' shared helpers live in the package (``griffon bench`` uses them too)."""

from griffon.bench.machine import best_time, copy_bandwidth, machine, matmul_peak_flops

__all__ = ["best_time", "copy_bandwidth", "machine", "matmul_peak_flops"]
