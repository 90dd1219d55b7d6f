"""Memory measured in tests: the peak of Python-side allocations (numpy's arrays included)."""

import gc
import tracemalloc


def peak_traced_bytes(fn) -> int:
    """The peak bytes traced by tracemalloc while ``fn()`` runs (PyTorch's tensors are not traced)."""
    gc.collect()
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
