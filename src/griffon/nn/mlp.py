"""Gated MLP of Griffin: ``down(gelu_tanh(gate(x)) * up(x))`` (GeGLU)."""

from __future__ import annotations

import math

from torch import nn
from torch.nn import functional as F


class GatedMLP(nn.Module):
    def __init__(self, width: int, expanded_width: int, out_init_scale: float = 1.0) -> None:
        super().__init__()
        self.gate = nn.Linear(width, expanded_width)
        self.up = nn.Linear(width, expanded_width)
        self.down = nn.Linear(expanded_width, width)
        self.out_init_scale = out_init_scale
        self.reset_parameters()

    def reset_parameters(self) -> None:
        width, expanded = self.gate.in_features, self.gate.out_features
        for lin in (self.gate, self.up):
            nn.init.normal_(lin.weight, std=math.sqrt(1.0 / width))
            nn.init.zeros_(lin.bias)
        nn.init.normal_(self.down.weight, std=math.sqrt(self.out_init_scale / expanded))
        nn.init.zeros_(self.down.bias)

    def forward(self, x):
        return self.down(F.gelu(self.gate(x), approximate="tanh") * self.up(x))
