"""The MLPs and norms against their formulas, and the config options that choose them."""

import pytest
import torch

from griffon import Griffon
from griffon.config import ModelConfig


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (x + 0.044715 * x**3)))


@pytest.mark.parametrize("mlp_type", ["geglu", "gelu"])
def test_mlps_match_their_formulas(mlp_type):
    from griffon.config import LinearStructure
    from griffon.nn.mlp import make_mlp

    torch.manual_seed(0)
    mlp = make_mlp(mlp_type, 12, 20, 1.0, LinearStructure()).double()
    with torch.no_grad():
        for p in mlp.parameters():
            p.normal_()
    x = torch.randn(3, 7, 12, dtype=torch.float64)
    lin = lambda m, v: v @ m.weight.T + m.bias  # noqa: E731
    if mlp_type == "geglu":  # Griffin: down(gelu(gate x) * up x)
        want = lin(mlp.down, _gelu_tanh(lin(mlp.gate, x)) * lin(mlp.up, x))
    else:  # GPT-2: down(gelu(up x))
        want = lin(mlp.down, _gelu_tanh(lin(mlp.up, x)))
    torch.testing.assert_close(mlp(x), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("norm_type", ["rmsnorm", "layernorm"])
def test_norms_match_their_formulas(norm_type):
    from griffon.nn.norms import make_norm

    norm = make_norm(norm_type, 10, 1e-6).double()
    with torch.no_grad():
        for p in norm.parameters():
            p.normal_()
    x = 3 * torch.randn(4, 10, dtype=torch.float64) + 1
    if norm_type == "rmsnorm":  # Griffin/Gemma: x / rms(x) * (1 + scale)
        want = x / (x.square().mean(-1, keepdim=True) + 1e-6).sqrt() * (1 + norm.scale)
    else:  # GPT-2: (x - mean) / std * weight + bias, biased variance
        centered = x - x.mean(-1, keepdim=True)
        want = centered / (centered.square().mean(-1, keepdim=True) + 1e-6).sqrt() * norm.weight + norm.bias
    torch.testing.assert_close(norm(x), want, rtol=1e-12, atol=1e-12)


def test_model_options_choose_those_layers():
    from griffon.nn.mlp import GatedMLP, GeluMLP
    from griffon.nn.norms import RMSNorm

    base = dict(vocab_size=32, width=16, num_layers=2, num_heads=2, mlp_width=32)
    plain = Griffon(ModelConfig(**base))
    gpt2 = Griffon(ModelConfig(**base, mlp_type="gelu", norm_type="layernorm"))
    assert isinstance(plain.blocks[1].mlp, GatedMLP) and isinstance(plain.final_norm, RMSNorm)
    assert isinstance(gpt2.blocks[1].mlp, GeluMLP) and type(gpt2.final_norm) is torch.nn.LayerNorm
    assert all(type(b.temporal_norm) is torch.nn.LayerNorm for b in gpt2.blocks)
