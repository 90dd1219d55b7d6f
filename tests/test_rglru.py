"""The RG-LRU against a step-by-step loop written here from the Griffin paper's equations."""

import torch

from griffon.nn.rglru import RGLRU

from segments import SEG


def _block_diagonal(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x (..., W) through H independent (W/H, W/H) blocks, written out block by block."""
    H, n, _ = weight.shape
    return torch.cat([x[..., h * n : (h + 1) * n] @ weight[h] + bias[h] for h in range(H)], dim=-1)


def naive_rglru(layer: RGLRU, x: torch.Tensor, seg: torch.Tensor, h0: torch.Tensor | None = None):
    """Griffin (arXiv 2402.19427) eq. 1-4, one step at a time: r_t and i_t gate, a_t = a^(c r_t)
    with a = sigmoid(Lambda) = sigmoid(-a_param) and c = 8, h_t = a_t h_{t-1} + sqrt(1 - a_t^2) (i_t x_t);
    a document start drops the carried state and its multiplier is 1."""
    B, T, W = x.shape
    a = torch.sigmoid(-layer.a_param)
    h = torch.zeros(B, W, dtype=x.dtype) if h0 is None else h0
    out = []
    for t in range(T):
        r = torch.sigmoid(_block_diagonal(x[:, t], layer.a_gate.weight, layer.a_gate.bias))
        i = torch.sigmoid(_block_diagonal(x[:, t], layer.input_gate.weight, layer.input_gate.bias))
        a_t = a ** (8 * r)
        start = (seg[:, t] == 0)[:, None]
        h = torch.where(start, i * x[:, t], a_t * h + torch.sqrt(1 - a_t**2) * (i * x[:, t]))
        out.append(h)
    return torch.stack(out, 1), h


def test_rglru_forward_and_gradients_match_the_equations():
    torch.manual_seed(0)
    layer = RGLRU(width=12, num_blocks=3).double()
    with torch.no_grad():
        layer.input_gate.bias.normal_()
        layer.a_gate.bias.normal_()
    x = torch.randn(3, 23, 12, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(3, 12, dtype=torch.float64)
    seg = SEG.clone()
    seg[1] += 4  # row 1 continues a document from the carried state h0
    got, last = layer(x, seg, h0)
    want, want_last = naive_rglru(layer, x, seg, h0)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(last, want_last, rtol=1e-12, atol=1e-12)
    w = torch.randn_like(got)
    grads = torch.autograd.grad((got * w).sum(), [x, *layer.parameters()])
    want_grads = torch.autograd.grad((want * w).sum(), [x, *layer.parameters()])
    for g, wg in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(g, wg, rtol=1e-10, atol=1e-12)


def test_rglru_sqrt_gradient_is_bounded_near_a_equal_one():
    """d sqrt(1 - a^2) is unbounded as a -> 1; the layer caps the sqrt's derivative at 1000."""
    from griffon.nn.rglru import _SqrtBoundDerivative

    x = torch.tensor([0.0, 1e-12, 0.25, 1.0], dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(_SqrtBoundDerivative.apply(x).sum(), x)
    torch.testing.assert_close(g, torch.tensor([1000.0, 1000.0, 1.0, 0.5], dtype=torch.float64))
