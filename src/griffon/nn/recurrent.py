"""Griffin's recurrent (Hawk) temporal block: gated branch times Conv1D -> RG-LRU branch."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from griffon.nn.conv1d import CausalConv1D
from griffon.nn.rglru import RGLRU, uses_fused_kernel


@dataclass
class RecurrentState:
    """Fixed-size decode state of one recurrent block."""

    rglru: torch.Tensor  # (B, lru_width) float32
    conv: torch.Tensor  # (B, conv_width - 1, lru_width)


class RecurrentBlock(nn.Module):
    """``linear_out(gelu(linear_y x) * rglru(conv1d(linear_x x)))``."""

    def __init__(
        self, width: int, lru_width: int, num_blocks: int, conv_width: int, out_init_scale: float = 1.0
    ) -> None:
        super().__init__()
        self.linear_y = nn.Linear(width, lru_width)
        self.linear_x = nn.Linear(width, lru_width)
        self.linear_out = nn.Linear(lru_width, width)
        self.conv = CausalConv1D(lru_width, conv_width)
        self.rglru = RGLRU(lru_width, num_blocks)
        self.out_init_scale = out_init_scale
        self.scan_backend = "auto"
        self.reset_parameters()

    def reset_parameters(self) -> None:
        width, lru_width = self.linear_x.in_features, self.linear_x.out_features
        for lin in (self.linear_x, self.linear_y):
            nn.init.normal_(lin.weight, std=math.sqrt(1.0 / width))
            nn.init.zeros_(lin.bias)
        nn.init.normal_(self.linear_out.weight, std=math.sqrt(self.out_init_scale / lru_width))
        nn.init.zeros_(self.linear_out.bias)
        self.conv.reset_parameters()
        self.rglru.reset_parameters()

    def init_state(self, batch: int, dtype: torch.dtype, device: torch.device) -> RecurrentState:
        lru_width = self.linear_x.out_features
        return RecurrentState(
            rglru=torch.zeros(batch, lru_width, dtype=torch.float32, device=device),
            conv=torch.zeros(batch, self.conv.kernel_width - 1, lru_width, dtype=dtype, device=device),
        )

    def forward(
        self, x: torch.Tensor, segment_pos: torch.Tensor, positions: torch.Tensor, state: RecurrentState | None
    ) -> tuple[torch.Tensor, RecurrentState]:
        """x (B, T, D) -> (B, T, D); ``positions`` is unused (recurrences need no absolute position)."""
        y = F.gelu(self.linear_y(x), approximate="tanh")  # (B, T, L)
        u = self.linear_x(x)  # (B, T, L)
        # The fused RG-LRU's switch also moves a fresh chunk's convolution to its Triton kernel.
        triton = state is None and uses_fused_kernel(u, self.scan_backend)
        u, conv_state = self.conv(u, segment_pos, None if state is None else state.conv, triton=triton)
        u, rglru_state = self.rglru(
            u, segment_pos, None if state is None else state.rglru, scan_backend=self.scan_backend
        )
        return self.linear_out(u * y), RecurrentState(rglru=rglru_state, conv=conv_state)
