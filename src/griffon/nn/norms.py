"""RMSNorm with a zero-initialised ``(1 + scale)`` gain, as in Griffin and Gemma."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps) * gain``, computed in float32 (float64 for float64 inputs) and
    cast back to the input dtype; the gain is ``1 + scale`` (``scale`` initialised to zero, as
    Griffin and Gemma have it) or, without ``unit_offset``, ``scale`` (initialised to one, Llama's)."""

    def __init__(self, width: int, eps: float = 1e-6, unit_offset: bool = True) -> None:
        super().__init__()
        self.eps, self.unit_offset = eps, unit_offset
        self.scale = nn.Parameter(torch.empty(width))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.unit_offset:
            nn.init.zeros_(self.scale)
        else:
            nn.init.ones_(self.scale)

    def gain(self) -> torch.Tensor:
        return 1.0 + self.scale if self.unit_offset else self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float32 statistics at least: in bfloat16 the mean of squares loses too many bits.
        acc = torch.promote_types(x.dtype, torch.float32)
        return F.rms_norm(x.to(acc), x.shape[-1:], self.gain().to(acc), self.eps).to(x.dtype)


def make_norm(norm_type: str, width: int, eps: float, unit_offset: bool = True) -> nn.Module:
    """``rmsnorm`` (above) or ``layernorm`` (``nn.LayerNorm`` with gain and bias, as in GPT-2)."""
    return RMSNorm(width, eps, unit_offset) if norm_type == "rmsnorm" else nn.LayerNorm(width, eps=eps)
