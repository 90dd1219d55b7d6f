"""The causal depthwise Conv1D of :mod:`griffon.nn.conv1d` in Triton, forward and backward.

The PyTorch formulation makes K passes over the activations, each reading and writing (B, T, C);
this kernel reads x once per tap from cache and writes y once. A program owns a (BT, BD) tile of
one row: ``y[t] = b + sum_k w[K-1-k] x[t-k]`` over taps in the same document (``segment_pos[t] >= k``)
and inside the chunk (a fresh sequence starts from zeros). Products accumulate in float32.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Tiles of (BLOCK_T, BLOCK_D), 4 warps. Compiled for sm_90, 16 x 64 takes 68 registers per thread
# forward and 155 backward without spills; 64 x 64 spilled heavily (cuobjdump -res-usage).
BLOCK_T = 16
BLOCK_D = 64


@triton.jit
def _conv_fwd_kernel(X, SEG, W, BIAS, Y, T, C, K: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    pid_d, pid_t, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t = pid_t * BT + tl.arange(0, BT)
    cols = pid_d * BD + tl.arange(0, BD)
    tmask, cmask = t < T, cols < C
    row = b.to(tl.int64) * T
    seg = tl.load(SEG + row + t, mask=tmask, other=0)
    acc = tl.zeros([BT, BD], dtype=tl.float32) + tl.load(BIAS + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    for k in tl.static_range(K):
        ok = tmask & (seg >= k) & (t >= k)
        xk = tl.load(X + (row + t - k)[:, None] * C + cols[None, :], mask=ok[:, None] & cmask[None, :], other=0.0)
        wk = tl.load(W + (K - 1 - k) * C + cols, mask=cmask, other=0.0).to(tl.float32)
        acc += xk.to(tl.float32) * wk[None, :]
    tl.store(
        Y + (row + t)[:, None] * C + cols[None, :], acc.to(Y.dtype.element_ty), mask=tmask[:, None] & cmask[None, :]
    )


@triton.jit
def _conv_bwd_kernel(X, SEG, W, DY, DX, DW, T, C, K: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    """dx[t] = sum_k w[K-1-k] dy[t+k] over the taps that reached t; DW gets this tile's partial
    sums sum_t dy[t] x[t-k], (K, BD) per program."""
    pid_d, pid_t, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t = pid_t * BT + tl.arange(0, BT)
    cols = pid_d * BD + tl.arange(0, BD)
    tmask, cmask = t < T, cols < C
    row = b.to(tl.int64) * T
    seg = tl.load(SEG + row + t, mask=tmask, other=0)
    dy = tl.load(DY + (row + t)[:, None] * C + cols[None, :], mask=tmask[:, None] & cmask[None, :], other=0.0)
    dy = dy.to(tl.float32)
    dx = tl.zeros([BT, BD], dtype=tl.float32)
    partial = DW + ((b * tl.num_programs(1) + pid_t) * K).to(tl.int64) * C
    for k in tl.static_range(K):
        wk = tl.load(W + (K - 1 - k) * C + cols, mask=cmask, other=0.0).to(tl.float32)
        # Tap k of output t + k read x[t] if t + k is in the chunk and in t's document.
        later = t + k
        lmask = later < T
        seg_later = tl.load(SEG + row + later, mask=lmask, other=0)
        used = lmask & (seg_later >= k)
        dy_later = tl.load(
            DY + (row + later)[:, None] * C + cols[None, :], mask=used[:, None] & cmask[None, :], other=0.0
        )
        dx += dy_later.to(tl.float32) * wk[None, :]
        ok = tmask & (seg >= k) & (t >= k)
        xk = tl.load(X + (row + t - k)[:, None] * C + cols[None, :], mask=ok[:, None] & cmask[None, :], other=0.0)
        tl.store(partial + (K - 1 - k) * C + cols, tl.sum(dy * xk.to(tl.float32), axis=0), mask=cmask)
    tl.store(
        DX + (row + t)[:, None] * C + cols[None, :], dx.to(DX.dtype.element_ty), mask=tmask[:, None] & cmask[None, :]
    )


def _grid(B: int, T: int, C: int) -> tuple[int, int, int]:
    return (triton.cdiv(C, BLOCK_D), triton.cdiv(T, BLOCK_T), B)


class _Conv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, seg, weight, bias):  # type: ignore[override]
        B, T, C = x.shape
        K = weight.shape[0]
        y = torch.empty_like(x)
        _conv_fwd_kernel[_grid(B, T, C)](x, seg, weight, bias, y, T, C, K=K, BT=BLOCK_T, BD=BLOCK_D)
        ctx.save_for_backward(x, seg, weight)
        return y

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x, seg, weight = ctx.saved_tensors
        B, T, C = x.shape
        K = weight.shape[0]
        grid = _grid(B, T, C)
        dx = torch.empty_like(x)
        dw = torch.empty(B * grid[1], K, C, dtype=torch.float32, device=x.device)
        _conv_bwd_kernel[grid](x, seg, weight, dy.contiguous(), dx, dw, T, C, K=K, BT=BLOCK_T, BD=BLOCK_D)
        db = dy.sum((0, 1), dtype=torch.float32)
        return dx, None, dw.sum(0).to(weight.dtype), db.to(weight.dtype)


@torch.compiler.disable
def causal_conv1d_gpu(
    x: torch.Tensor, segment_pos: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """y (B, T, C) in x's dtype of a fresh chunk x (B, T, C) (no earlier inputs); weight (K, C), bias (C,)."""
    if x.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("causal_conv1d_gpu needs CUDA tensors (or TRITON_INTERPRET=1 to interpret it on the CPU)")
    if x.dim() != 3 or weight.dim() != 2 or weight.shape[1] != x.shape[2] or segment_pos.shape != x.shape[:2]:
        raise ValueError(f"x (B, T, C), weight (K, C), segment_pos (B, T): got {tuple(x.shape)}, "
                         f"{tuple(weight.shape)}, {tuple(segment_pos.shape)}")  # fmt: skip
    return _Conv.apply(x.contiguous(), segment_pos.contiguous(), weight.contiguous(), bias.contiguous())
