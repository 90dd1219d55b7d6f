"""Causal depthwise Conv1D that never mixes documents, with a fixed-size decode state."""

from __future__ import annotations

import math

import torch
from torch import nn


class CausalConv1D(nn.Module):
    """``y[t] = b + sum_k w[K-1-k] * x[t-k]`` over ``k < K``, skipping ``x[t-k]`` from an earlier document.

    ``x[t-k]`` belongs to the same document as ``x[t]`` exactly when ``segment_pos[t] >= k``,
    which works the same whether ``x[t-k]`` lies in this chunk or in the carried state, so one
    code path serves training, chunked prefill and single-token decoding.
    The weight layout ``(K, C)`` follows the DeepMind port (``w[K-1]`` multiplies the current input).
    """

    def __init__(self, channels: int, kernel_width: int) -> None:
        super().__init__()
        self.kernel_width = kernel_width
        self.weight = nn.Parameter(torch.empty(kernel_width, channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=math.sqrt(0.01 / self.kernel_width))
        nn.init.zeros_(self.bias)

    def forward(
        self, x: torch.Tensor, segment_pos: torch.Tensor, state: torch.Tensor | None = None, triton: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: x (B, T, C); segment_pos (B, T); state (B, K-1, C), the previous inputs (zeros if None);
        triton: compute a fresh chunk (``state=None``) with the Triton kernel (nn/conv1d_gpu.py).

        Returns: y (B, T, C) and the new state (B, K-1, C).
        """
        B, T, C = x.shape
        K = self.kernel_width
        if triton and state is not None:
            raise ValueError("the Triton Conv1D computes fresh chunks only (state=None)")
        if state is None:
            state = x.new_zeros(B, K - 1, C)
        # The kernel needs only the new state from here; the PyTorch path reads all of xp.
        xp = torch.cat([state.to(x.dtype), x[:, max(T - (K - 1), 0) :] if triton else x], dim=1)
        # The new state in a tensor of its own, laid out the same whatever the chunk length:
        # torch.compile specialises on strides, so a compiled decode step would compile twice.
        new_state = xp[:, xp.shape[1] - (K - 1) :].clone(memory_format=torch.contiguous_format)  # (B, K-1, C)
        if triton:
            from griffon.nn.conv1d_gpu import causal_conv1d_gpu

            return causal_conv1d_gpu(x, segment_pos, self.weight, self.bias), new_state
        w = self.weight.to(x.dtype)
        if T == 1:  # a decode step: one masked weighted sum over the window instead of K passes
            lags = torch.arange(K - 1, -1, -1, device=x.device)  # xp[:, j] is lags[j] tokens back
            taps = w * (lags <= segment_pos[:, :1])[:, :, None]  # (B, K, C): no tap across a document start
            return (xp * taps).sum(1, keepdim=True) + self.bias.to(x.dtype), new_state
        y = xp[:, K - 1 :] * w[K - 1]
        for k in range(1, K):
            same_doc = (segment_pos >= k).unsqueeze(-1)  # (B, T, 1)
            y = y + torch.where(same_doc, xp[:, K - 1 - k : K - 1 - k + T], 0.0) * w[K - 1 - k]
        return y + self.bias.to(x.dtype), new_state
