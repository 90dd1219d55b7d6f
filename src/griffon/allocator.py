"""Keep freed memory in the process instead of handing it back to the OS (glibc only).

glibc serves large allocations (over its mmap threshold, at most 32 MiB) with fresh ``mmap``
pages and unmaps them on free, so every training step faults in its activations and gradients
page by page again. On the project's 2-core machines that costs the fp32 scan's autograd path
3x its kernels' time (docs/scan.md). Raising the mmap and trim thresholds makes glibc reuse freed
heap memory, as jemalloc/tcmalloc would. It is a process-wide setting, so the library never
applies it on import: the trainer and the benchmarks call :func:`keep_freed_memory` at start.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_LIMIT = 1 << 30  # allocations up to 1 GiB come from the reusable heap


def keep_freed_memory() -> bool:
    """Tune glibc malloc to reuse freed memory. Returns False where it does not apply (not glibc)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _LIMIT)) and bool(mallopt(_M_TRIM_THRESHOLD, _LIMIT))
