"""Fast CPU linear scan: numba kernels, parallel over (batch, channel block), sequential in time.

The scan is memory-bound (a few flops per element moved): forward reads ``a`` and ``x`` and writes ``h``
(12 B/element in fp32); the backward reads ``dh``, ``a`` and ``h`` and writes ``dx`` and ``da``
(20 B/element). Each kernel touches every array exactly once, so fwd+bwd is close to that bound.
Work is split into independent (batch row, channel block) jobs; each walks time sequentially with
the channel block in its inner loop, which the compiler vectorises.
"""

from __future__ import annotations

import numba
import numpy as np
import torch


@numba.njit(parallel=True, cache=True, nogil=True, boundscheck=False)
def scan_forward(a, x, reset, h0, h, h_last, n_split):  # pragma: no cover - compiled
    """h (B, T, D) and h_last (B, D), written in place, of ``h_t = a_t h_{t-1} + x_t`` (h_{-1} = h0,
    dropped where ``reset``); jobs are (batch row, one of ``n_split`` channel blocks)."""
    B, T, D = x.shape
    block = (D + n_split - 1) // n_split
    for job in numba.prange(B * n_split):
        b = job // n_split
        d0 = (job % n_split) * block
        d1 = min(d0 + block, D)
        state = h0[b, d0:d1].copy()
        for t in range(T):
            # Row views (not flat indexing) let LLVM prove the rows disjoint and vectorise.
            a_t, x_t, h_t = a[b, t, d0:d1], x[b, t, d0:d1], h[b, t, d0:d1]
            if reset[b, t]:
                for d in range(d1 - d0):
                    state[d] = x_t[d]
                    h_t[d] = state[d]
            else:
                for d in range(d1 - d0):
                    state[d] = a_t[d] * state[d] + x_t[d]
                    h_t[d] = state[d]
        h_last[b, d0:d1] = state


@numba.njit(parallel=True, cache=True, nogil=True, boundscheck=False)
def scan_backward(a, reset, h0, h, grad_h, grad_last, grad_a, grad_x, grad_h0, n_split):  # pragma: no cover
    """grad_a, grad_x (B, T, D) and grad_h0 (B, D), written in place: the reverse scan of
    :func:`scan_forward` given the output gradients grad_h and grad_last."""
    B, T, D = h.shape
    block = (D + n_split - 1) // n_split
    for job in numba.prange(B * n_split):
        b = job // n_split
        d0 = (job % n_split) * block
        d1 = min(d0 + block, D)
        # carry = dL/dh_t from the future; it starts as the final state's gradient.
        carry = grad_last[b, d0:d1].copy()
        for t in range(T - 1, -1, -1):
            a_t, gh_t = a[b, t, d0:d1], grad_h[b, t, d0:d1]
            ga_t, gx_t = grad_a[b, t, d0:d1], grad_x[b, t, d0:d1]
            h_prev = h[b, t - 1, d0:d1] if t > 0 else h0[b, d0:d1]
            keep = a.dtype.type(0.0) if reset[b, t] else a.dtype.type(1.0)
            for d in range(d1 - d0):
                g = carry[d] + gh_t[d]
                gx_t[d] = g
                g = keep * g
                ga_t[d] = g * h_prev[d]
                carry[d] = g * a_t[d]
        grad_h0[b, d0:d1] = carry


# Numba starts its thread pool (OpenMP here) on first use, and starting it sets the process's OpenMP
# thread count to numba's pool size, which torch's kernels then use too: a process started with
# OMP_NUM_THREADS=1 (or torch.set_num_threads(1)) ran torch on every core after its first scan. So the
# pool is started here, at import, and torch's count put back.
_TORCH_THREADS = torch.get_num_threads()
numba.set_num_threads(min(_TORCH_THREADS, numba.config.NUMBA_NUM_THREADS))
torch.set_num_threads(_TORCH_THREADS)


def match_torch_threads() -> int:
    """Give numba's next parallel kernel as many threads as torch has (``torch.set_num_threads``,
    ``OMP_NUM_THREADS``), at most numba's pool; return the number. Numba sizes its pool from the CPU
    count at import and ignores ``OMP_NUM_THREADS``: a process told to use one thread ran its numba
    kernels on every core, and the extra OpenMP worker spun in its wait loop between kernels, on
    the cores the process had been told to leave to others (one-thread training processes running
    side by side went several times slower). Call before each launch (the setting is per thread)."""
    n = min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)
    if numba.get_num_threads() != n:
        numba.set_num_threads(n)
    return n


def row_split(batch: int) -> int:
    """Channel blocks per batch row: just enough jobs to occupy every thread.

    Whole rows keep each time step's reads contiguous (a 128-channel block touched a new page
    per step and ran 3x slower), so rows are split only when the batch is smaller than the threads.
    """
    return max(1, -(-match_torch_threads() // batch))


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


class _CpuScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, x, h0, reset):  # type: ignore[override]
        h = torch.empty_like(x)
        h_last = torch.empty_like(h0)
        scan_forward(_np(a), _np(x), _np(reset), _np(h0), _np(h), _np(h_last), row_split(x.shape[0]))
        ctx.save_for_backward(a, h0, reset, h)
        return h, h_last

    @staticmethod
    def backward(ctx, grad_h, grad_last):  # type: ignore[override]
        a, h0, reset, h = ctx.saved_tensors
        grad_h = torch.zeros_like(h) if grad_h is None else grad_h.contiguous()
        grad_last = torch.zeros_like(h0) if grad_last is None else grad_last.contiguous()
        grad_a, grad_x, grad_h0 = torch.empty_like(a), torch.empty_like(h), torch.empty_like(h0)
        scan_backward(
            _np(a), _np(reset), _np(h0), _np(h), _np(grad_h), _np(grad_last),
            _np(grad_a), _np(grad_x), _np(grad_h0), row_split(h.shape[0]),
        )  # fmt: skip
        return grad_a, grad_x, grad_h0, None


def linear_scan_cpu(
    a: torch.Tensor, x: torch.Tensor, h0: torch.Tensor, reset: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """CPU scan on contiguous float32/float64 tensors; see :func:`griffon.scan.linear_scan`."""
    return _CpuScan.apply(a.contiguous(), x.contiguous(), h0.contiguous(), reset.contiguous())
