"""The Real-Gated Linear Recurrent Unit (RG-LRU) of Griffin (arXiv 2402.19427, eq. 1-4)."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from griffon.scan import default_backend, linear_scan

# The recurrence's fixed exponent c in a_t = a^(c * r_t).
RGLRU_C = 8.0
# sqrt'(x) = 1/(2 sqrt x) is unbounded as a_t -> 1; the references cap it at 1000.
MAX_SQRT_GRADIENT = 1000.0


class BlockDiagonalLinear(nn.Module):
    """``num_blocks`` independent ``(w/n, w/n)`` linears over consecutive channel groups, with bias."""

    def __init__(self, width: int, num_blocks: int) -> None:
        super().__init__()
        self.num_blocks = num_blocks
        block = width // num_blocks
        self.weight = nn.Parameter(torch.empty(num_blocks, block, block))  # (H, in, out)
        self.bias = nn.Parameter(torch.zeros(num_blocks, block))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=math.sqrt(1.0 / self.weight.shape[1]))
        nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, i, _ = self.weight.shape
        xs = x.reshape(-1, H, i).transpose(0, 1)  # (H, N, i)
        # One batched matmul with the bias fused: twice as fast as the equivalent einsum.
        y = torch.baddbmm(self.bias.to(x.dtype)[:, None, :], xs, self.weight.to(x.dtype))  # (H, N, j)
        return y.transpose(0, 1).reshape(x.shape)


class _SqrtBoundDerivative(torch.autograd.Function):
    """``sqrt(x)`` whose gradient is capped at ``MAX_SQRT_GRADIENT`` (keeps bf16 training finite)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        return torch.sqrt(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return grad / torch.sqrt(torch.clamp(4.0 * x, min=1.0 / MAX_SQRT_GRADIENT**2))


def init_a_param(a_param: torch.Tensor, min_rad: float = 0.9, max_rad: float = 0.999) -> None:
    """Set ``a = sigmoid(-a_param)`` in ``[min_rad, max_rad]`` with ``a^2`` uniform (area of a ring).

    As the reference code (recurrentgemma's ``rnn_param_init``) does; the paper's text (arXiv
    2402.19427, Section 2.4) draws ``a^c`` uniformly instead."""
    with torch.no_grad():
        a_param.uniform_(min_rad**2 + 1e-8, max_rad**2 + 1e-8)
        # a = sqrt(u); a_param = softplus^-1(-log a) = log(exp(-log a) - 1)
        a_param.log_().mul_(0.5).neg_().exp_().sub_(1.0).log_()


def uses_fused_kernel(x: torch.Tensor, scan_backend: str) -> bool:
    """Whether :class:`RGLRU` runs on x (B, T, W) through the fused Triton kernels: when asked
    (``scan_backend="triton"``), and by default for chunks of a GPU training or prefill pass. Decode
    steps (T = 1) keep the PyTorch path, which the compiled and CUDA-graph decode steps capture."""
    if scan_backend == "triton":
        return True
    return scan_backend == "auto" and x.shape[1] > 1 and default_backend(x.device, x.dtype) == "triton"


class RGLRU(nn.Module):
    """Per-channel gated linear recurrence with input and recurrence gates.

    ``i_t = sigmoid(W_x x_t)``, ``r_t = sigmoid(W_a x_t)``, ``a_t = a^(8 r_t)`` with
    ``a = sigmoid(-a_param)``; ``h_t = a_t h_{t-1} + sqrt(1 - a_t^2) (i_t * x_t)``; at a
    document start (``segment_pos == 0``) the carried state is dropped and the multiplier is 1.
    """

    def __init__(self, width: int, num_blocks: int) -> None:
        super().__init__()
        self.width = width
        self.a_param = nn.Parameter(torch.empty(width))
        self.input_gate = BlockDiagonalLinear(width, num_blocks)
        self.a_gate = BlockDiagonalLinear(width, num_blocks)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.input_gate.reset_parameters()
        self.a_gate.reset_parameters()
        init_a_param(self.a_param)

    def forward(
        self,
        x: torch.Tensor,
        segment_pos: torch.Tensor,
        state: torch.Tensor | None = None,
        scan_backend: str = "auto",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: x (B, T, W); segment_pos (B, T); state (B, W) float32 or None.

        Returns: y (B, T, W) in x's dtype and the final state (B, W) in float32 (float64 for float64 x).
        """
        reset = segment_pos == 0  # (B, T)
        if uses_fused_kernel(x, scan_backend):
            from griffon.scan.gpu import rglru_scan_gpu

            # One Triton kernel pair does everything below from the gates' pre-activations, in float32.
            return rglru_scan_gpu(
                x, self.input_gate(x), self.a_gate(x), F.softplus(self.a_param.float()),
                None if state is None else state.float(), reset, c=RGLRU_C, max_sqrt_gradient=MAX_SQRT_GRADIENT,
            )  # fmt: skip
        # The gates' matmuls run in x's dtype (bf16 under autocast); everything after them is
        # float32 (float64 if x is): the decay sits near 1, where bf16 cannot resolve 1 - a_t^2.
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        gate_x = torch.sigmoid(self.input_gate(x).to(acc))
        gate_a = torch.sigmoid(self.a_gate(x).to(acc))
        log_a = -RGLRU_C * gate_a * F.softplus(self.a_param.to(acc))  # (B, T, W)
        a = torch.exp(log_a)
        one_minus_a2 = 1.0 - torch.exp(2.0 * log_a)
        # The bounded-gradient sqrt matters only for backward; sampling skips its Python overhead.
        multiplier = _SqrtBoundDerivative.apply(one_minus_a2) if torch.is_grad_enabled() else one_minus_a2.sqrt()
        multiplier = torch.where(reset.unsqueeze(-1), 1.0, multiplier)
        normalized_x = x.to(acc) * gate_x * multiplier
        if state is not None:
            state = state.to(acc)
        h, last = linear_scan(a, normalized_x, state, reset, backend=scan_backend)
        return h.to(x.dtype), last
