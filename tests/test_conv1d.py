"""The causal depthwise conv against the sum written out, whole sequences and token by token."""

import torch

from griffon.nn.conv1d import CausalConv1D

from segments import SEG, doc_ids


def naive_conv(conv: CausalConv1D, x: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
    """y_t = b + sum_k w[K-1-k] x_{t-k} over the taps that exist and lie in x_t's document."""
    B, T, C = x.shape
    K = conv.kernel_width
    docs = doc_ids(seg)
    y = torch.zeros_like(x)
    for b in range(B):
        for t in range(T):
            y[b, t] = conv.bias
            for k in range(K):
                if t - k >= 0 and docs[b, t - k] == docs[b, t]:
                    y[b, t] += conv.weight[K - 1 - k] * x[b, t - k]
    return y


def test_conv_matches_the_sum_whole_and_step_by_step():
    torch.manual_seed(0)
    conv = CausalConv1D(channels=5, kernel_width=4).double()
    with torch.no_grad():
        conv.bias.normal_()
    x = torch.randn(3, 23, 5, dtype=torch.float64)
    want = naive_conv(conv, x, SEG)
    got, _ = conv(x, SEG)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    state, steps = None, []
    for t in range(23):  # the decode branch, one token at a time through the carried state
        y, state = conv(x[:, t : t + 1], SEG[:, t : t + 1], state)
        steps.append(y)
    torch.testing.assert_close(torch.cat(steps, 1), want, rtol=1e-12, atol=1e-12)
