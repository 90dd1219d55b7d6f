"""The linear scan ``h_t = a_t * h_{t-1} + x_t`` and its dispatch to a backend.

Backends:
    ``reference``  plain loop under autograd, float64-capable: the test oracle.
    ``cpu``        numba kernels, forward and backward near the memory bound.
    ``loop``       portable time loop with a linear-time backward (any device).
    ``triton``     tiled Triton kernels (scan/gpu.py), chunked in time when B*D is small.

``auto`` picks ``cpu`` for CPU tensors, ``triton`` for float32 GPU tensors when Triton is installed,
and ``loop`` otherwise. Under ``TRITON_INTERPRET=1`` the ``triton`` backend also runs on CPU
tensors (slowly): that is how its tests run without a GPU.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable

import torch

from griffon.scan.loop import linear_scan_loop
from griffon.scan.reference import linear_scan_reference

ScanFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _cpu(a: torch.Tensor, x: torch.Tensor, h0: torch.Tensor, reset: torch.Tensor):
    # Imported lazily: numba compiles (or loads its cache) on first use only.
    from griffon.scan.cpu import linear_scan_cpu

    return linear_scan_cpu(a, x, h0, reset)


def _triton(a: torch.Tensor, x: torch.Tensor, h0: torch.Tensor, reset: torch.Tensor):
    # Imported lazily: Triton is optional (GPU installs of torch bring it).
    from griffon.scan.gpu import linear_scan_gpu

    if x.dtype == torch.float64:
        raise ValueError("the triton scan backend accumulates in float32; use 'loop' for float64")
    return linear_scan_gpu(a, x, h0, reset)


BACKENDS: dict[str, ScanFn] = {
    "reference": lambda a, x, h0, reset: linear_scan_reference(a, x, h0, reset),
    "cpu": _cpu,
    "loop": linear_scan_loop,
    "triton": _triton,
}


@functools.cache  # asked on every GPU forward of a recurrent block: look the package up once
def triton_available() -> bool:
    """Whether Triton is installed (its kernels then run on a GPU, or in its interpreter)."""
    return importlib.util.find_spec("triton") is not None


def default_backend(device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """The fastest registered backend for tensors of ``dtype`` on ``device``."""
    if device.type == "cpu":
        return "cpu"
    if device.type == "cuda" and dtype != torch.float64 and triton_available():
        return "triton"
    return "loop"


def linear_scan(
    a: torch.Tensor,
    x: torch.Tensor,
    h0: torch.Tensor | None = None,
    reset: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compute ``h_t = a_t * h_{t-1} + x_t`` along dim 1.

    Args:
        a: (B, T, D) decay; float32 or float64 (the accumulation dtype).
        x: (B, T, D) input, same dtype as ``a``.
        h0: (B, D) initial state; zeros when ``None``.
        reset: (B, T) bool; where true the carried state is dropped (``a_t`` acts as 0).
        backend: ``auto`` or a key of :data:`BACKENDS`.

    Returns:
        ``(h, h_last)``: states (B, T, D) and final state (B, D). Differentiable in ``a``, ``x``, ``h0``.
    """
    if a.shape != x.shape or x.dim() != 3:
        raise ValueError(
            f"linear_scan expects a and x of equal shape (B, T, D), got {tuple(a.shape)} and {tuple(x.shape)}"
        )
    if a.dtype != x.dtype or x.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"linear_scan accumulates in float32 or float64; got a {a.dtype}, x {x.dtype}")
    B, T, D = x.shape
    if h0 is None:
        h0 = x.new_zeros(B, D)
    elif h0.shape != (B, D) or h0.dtype != x.dtype:
        raise ValueError(f"h0 must be ({B}, {D}) {x.dtype}, got {tuple(h0.shape)} {h0.dtype}")
    if reset is None:
        reset = torch.zeros(B, T, dtype=torch.bool, device=x.device)
    elif reset.shape != (B, T) or reset.dtype != torch.bool:
        raise ValueError(f"reset must be a ({B}, {T}) bool tensor, got {tuple(reset.shape)} {reset.dtype}")
    if T == 1 and backend == "auto":
        # A decode step: one fused multiply-add beats any kernel launch (10x less overhead on CPU).
        h = torch.where(reset[:, 0, None], x[:, 0], torch.addcmul(x[:, 0], a[:, 0], h0))
        return h[:, None], h
    name = default_backend(x.device, x.dtype) if backend == "auto" else backend
    if name not in BACKENDS:
        raise ValueError(f"unknown scan backend {name!r}; known: {sorted(BACKENDS)}")
    if name == "cpu" and x.device.type != "cpu":
        raise ValueError("the cpu scan backend needs CPU tensors")
    return BACKENDS[name](a, x, h0, reset)


__all__ = ["BACKENDS", "default_backend", "triton_available", "linear_scan", "linear_scan_reference"]
