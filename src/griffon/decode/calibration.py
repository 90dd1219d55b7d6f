"""Pre-merging a structured FFN for decoding: the call size up to which the merged dense weight wins.

A structured layer (:mod:`griffon.nn.structured`) computes ``x W`` through its factors; at a
decode step's few tokens one matmul by the merged dense ``W`` is faster, beyond some call size the
factors are. The crossover depends on the machine, the width and the kind (docs/structured_ffn.md),
so it is measured here. Calibration is explicit: generation runs the model as configured, and the
command line calibrates before sampling.
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn
from torch.nn import functional as F

from griffon.nn.structured import StructuredLinear


def _call_seconds(fn, x: torch.Tensor, repeats: int) -> float:
    """Best of ``repeats`` timings of ``fn(x)`` (after one warm-up call)."""
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    fn(x)
    best = math.inf
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn(x)
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


@torch.no_grad()
def calibrate_merge_threshold(layer: StructuredLinear, max_tokens: int = 512, repeats: int = 7) -> int:
    """The largest call size (a power of two up to ``max_tokens``) at which the merged dense weight
    is faster than the factors on this machine; 0 if the factors win already at one token."""
    p = layer.factors()[0]
    weight = layer.merged_weight()
    threshold, n = 0, 1
    g = torch.Generator(device=p.device).manual_seed(0)  # leave the global RNG alone
    while n <= max_tokens:
        x = torch.randn(n, layer.in_features, dtype=p.dtype, device=p.device, generator=g)
        structured = _call_seconds(layer.forward_structured, x, repeats)
        merged = _call_seconds(lambda x: F.linear(x, weight), x, repeats)
        if merged >= structured:  # the factors' advantage grows with the call size
            break
        threshold, n = n, 2 * n
    return threshold


def calibrate_merge_thresholds(model: nn.Module, force: bool = False) -> dict[str, int]:
    """Give every structured layer without a threshold (or all, with ``force``) the one measured
    for its shape, kind, dtype and device; return the thresholds by layer name."""
    measured: dict[tuple, int] = {}
    chosen = {}
    for name, layer in model.named_modules():
        if not isinstance(layer, StructuredLinear) or (layer.merge_threshold is not None and not force):
            continue
        p = layer.factors()[0]
        key = (type(layer), tuple(f.shape for f in layer.factors()), p.dtype, p.device)
        if key not in measured:
            measured[key] = calibrate_merge_threshold(layer)
        layer.merge_threshold = chosen[name] = measured[key]
    return chosen
