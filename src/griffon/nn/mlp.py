"""The channel-mixing MLPs: Griffin's gated GeGLU and the GPT-2-style GeLU MLP.

Each projection is dense or structured (:mod:`griffon.nn.structured`), as the config chooses.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from griffon.config import LinearStructure
from griffon.nn.structured import init_linear_, make_linear


class _MLP(nn.Module):
    """What both MLPs share: input projections at std ``1/sqrt(width)``, the output projection at
    ``sqrt(out_init_scale / expanded_width)`` (smaller in deeper models)."""

    down: nn.Module

    def __init__(self, width: int, expanded_width: int, out_init_scale: float) -> None:
        super().__init__()
        self.width, self.expanded_width, self.out_init_scale = width, expanded_width, out_init_scale

    def _stds(self) -> tuple[float, float]:
        return math.sqrt(1.0 / self.width), math.sqrt(self.out_init_scale / self.expanded_width)

    def _inputs(self) -> tuple[nn.Module, ...]:
        raise NotImplementedError

    def _projections(self) -> tuple[nn.Module, ...]:
        return (*self._inputs(), self.down)

    def reset_parameters(self) -> None:
        in_std, out_std = self._stds()
        for layer in self._inputs():
            init_linear_(layer, in_std)
        init_linear_(self.down, out_std)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


GATE_ACTIVATIONS = {"geglu": gelu_tanh, "swiglu": F.silu}
"""The gate's nonlinearity of each gated MLP type: Griffin's GeGLU (tanh-approximated GeLU) and
Llama's SwiGLU (SiLU)."""


class GatedMLP(_MLP):
    """``down(act(gate(x)) * up(x))``: GeGLU (Griffin, RecurrentGemma) or SwiGLU (Llama)."""

    def __init__(
        self, width: int, expanded_width: int, out_init_scale: float = 1.0, structure: LinearStructure | None = None,
        mlp_type: str = "geglu", bias: bool = True,
    ) -> None:  # fmt: skip
        super().__init__(width, expanded_width, out_init_scale)
        structure = structure or LinearStructure()
        in_std, out_std = self._stds()
        self.mlp_type, self.act = mlp_type, GATE_ACTIVATIONS[mlp_type]
        # Each layer is initialised once, at construction (a structured layer's init is an SVD).
        self.gate = make_linear(width, expanded_width, structure, bias, std=in_std)
        self.up = make_linear(width, expanded_width, structure, bias, std=in_std)
        self.down = make_linear(expanded_width, width, structure, bias, std=out_std)

    def _inputs(self) -> tuple[nn.Module, ...]:
        return (self.gate, self.up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.gate(x)) * self.up(x))


class GeluMLP(_MLP):
    """``down(gelu_tanh(up(x)))``: the FFN of GPT-2 and of the StructuredFFN transformers."""

    def __init__(
        self, width: int, expanded_width: int, out_init_scale: float = 1.0, structure: LinearStructure | None = None,
        bias: bool = True,
    ) -> None:  # fmt: skip
        super().__init__(width, expanded_width, out_init_scale)
        structure = structure or LinearStructure()
        in_std, out_std = self._stds()
        self.up = make_linear(width, expanded_width, structure, bias, std=in_std)
        self.down = make_linear(expanded_width, width, structure, bias, std=out_std)

    def _inputs(self) -> tuple[nn.Module, ...]:
        return (self.up,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(gelu_tanh(self.up(x)))


def make_mlp(
    mlp_type: str, width: int, expanded_width: int, out_init_scale: float, structure: LinearStructure,
    bias: bool = True,
) -> GatedMLP | GeluMLP:  # fmt: skip
    """The MLP named by ``mlp_type`` (``geglu``, ``swiglu`` or ``gelu``)."""
    if mlp_type in GATE_ACTIVATIONS:
        return GatedMLP(width, expanded_width, out_init_scale, structure, mlp_type, bias)
    return GeluMLP(width, expanded_width, out_init_scale, structure, bias)
