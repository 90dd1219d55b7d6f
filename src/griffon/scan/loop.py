"""Device-agnostic scan: a time loop with a hand-written backward (O(T) kernels each way).

This is the portable fallback for devices without a dedicated kernel. Unlike the reference under
plain autograd, its backward is linear in T: it walks time in reverse once.
"""

from __future__ import annotations

import torch


class _LoopScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, x, h0, reset):  # type: ignore[override]
        a = a.masked_fill(reset[..., None], 0.0)
        h = torch.empty_like(x)
        state = h0
        for t in range(x.shape[1]):
            state = torch.addcmul(x[:, t], a[:, t], state)
            h[:, t] = state
        ctx.save_for_backward(a, h0, h, reset)
        return h, state

    @staticmethod
    def backward(ctx, grad_h, grad_last):  # type: ignore[override]
        a, h0, h, reset = ctx.saved_tensors
        grad_h = torch.zeros_like(h) if grad_h is None else grad_h
        carry = torch.zeros_like(h0) if grad_last is None else grad_last.clone()
        grad_x = torch.empty_like(h)
        grad_a = torch.empty_like(a)
        for t in range(h.shape[1] - 1, -1, -1):
            carry = carry + grad_h[:, t]
            grad_x[:, t] = carry
            grad_a[:, t] = carry * (h[:, t - 1] if t > 0 else h0)
            carry = carry * a[:, t]
        # a was replaced by 0 at resets, so the original a gets no gradient there.
        return grad_a.masked_fill_(reset[..., None], 0.0), grad_x, carry, None


def linear_scan_loop(
    a: torch.Tensor, x: torch.Tensor, h0: torch.Tensor, reset: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Portable scan; see :func:`griffon.scan.linear_scan`."""
    return _LoopScan.apply(a, x, h0, reset)
