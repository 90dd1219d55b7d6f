"""Token embedding, optionally scaled by sqrt(width); its transpose is the tied output head."""

from __future__ import annotations

import math

import torch
from torch import nn


class Embedding(nn.Module):
    def __init__(self, vocab_size: int, width: int, scale_by_sqrt_width: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, width))
        # The references round sqrt(width) to bfloat16 (50.5 instead of 50.596 for width 2560);
        # checkpoints were trained with that constant, so keep it bit-exact.
        scale = torch.tensor(math.sqrt(width), device="cpu").bfloat16().item() if scale_by_sqrt_width else 1.0
        self.scale = scale
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=math.sqrt(1.0 / self.weight.shape[1]))

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.weight[tokens]  # (B, T, D)
        return x * self.scale if self.scale != 1.0 else x

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.to(x.dtype).T  # (B, T, V)
