"""Reference linear scan: a plain loop, exact in float64, used as the oracle for fast paths."""

from __future__ import annotations

import torch


def linear_scan_reference(
    a: torch.Tensor,
    x: torch.Tensor,
    h0: torch.Tensor | None = None,
    reset: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``h_t = a_t * h_{t-1} + x_t`` over dim 1, with ``a_t`` taken as 0 where ``reset``.

    Args:
        a, x: (B, T, D) decay and input.
        h0: (B, D) initial state, zeros when ``None``.
        reset: (B, T) bool; a reset drops the carried state at that step.

    Returns:
        ``(h, h_last)``: all states (B, T, D) and the final state (B, D), in the inputs' dtype.
        Differentiable through plain autograd (whose backward costs O(T^2): tests only).
    """
    if reset is not None:
        a = a.masked_fill(reset[..., None], 0.0)
    h = torch.zeros_like(x[:, 0]) if h0 is None else h0.to(x.dtype)
    out = []
    for t in range(x.shape[1]):
        h = a[:, t] * h + x[:, t]
        out.append(h)
    return torch.stack(out, dim=1), h


def linear_scan_varlen_reference(
    a: torch.Tensor,
    x: torch.Tensor,
    cu_seqlens: torch.Tensor,
    h0: torch.Tensor | None = None,
    reset: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`linear_scan_reference` over N sequences packed in one stream (flash-attention's layout).

    Args:
        a, x: (1, total, D); cu_seqlens: (N+1,) offsets, sequence n is ``[cu[n], cu[n+1])``.
        h0: (N, D) initial state of each sequence; reset: (1, total) bool, as in the batched scan.

    Returns:
        ``(h, h_last)``: states (1, total, D) and each sequence's final state (N, D).
    """
    outs, lasts = [], []
    for n in range(cu_seqlens.numel() - 1):
        s, e = int(cu_seqlens[n]), int(cu_seqlens[n + 1])
        h, last = linear_scan_reference(
            a[:, s:e], x[:, s:e], None if h0 is None else h0[n : n + 1], None if reset is None else reset[:, s:e]
        )
        outs.append(h)
        lasts.append(last)
    return torch.cat(outs, dim=1), torch.cat(lasts, dim=0)
