"""RMSNorm with a zero-initialised ``(1 + scale)`` gain, as in Griffin and Gemma."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps) * (1 + scale)``, computed in float32 (float64 for float64 inputs)
    and cast back to the input dtype."""

    def __init__(self, width: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.zeros(width))

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float32 statistics at least: in bfloat16 the mean of squares loses too many bits.
        acc = torch.promote_types(x.dtype, torch.float32)
        return F.rms_norm(x.to(acc), x.shape[-1:], 1.0 + self.scale.to(acc), self.eps).to(x.dtype)


def make_norm(norm_type: str, width: int, eps: float) -> nn.Module:
    """``rmsnorm`` (above) or ``layernorm`` (``nn.LayerNorm`` with gain and bias, as in GPT-2)."""
    return RMSNorm(width, eps) if norm_type == "rmsnorm" else nn.LayerNorm(width, eps=eps)
