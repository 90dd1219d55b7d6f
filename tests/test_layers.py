"""The RG-LRU, the causal conv and attention, each against a naive loop written from its equations
here (no reference package needed), on document boundaries and sequences longer than the window."""

import pytest
import torch

from griffon import Griffon
from griffon.config import ModelConfig
from griffon.nn.attention import Attention
from griffon.nn.conv1d import CausalConv1D
from griffon.nn.rglru import RGLRU
from test_model import _doc_positions

SEG = torch.stack([_doc_positions(23, [9]), _doc_positions(23, []), _doc_positions(23, [1, 2, 15])])  # (3, 23)


def _doc_ids(seg: torch.Tensor) -> torch.Tensor:
    return (seg == 0).cumsum(-1)  # (B, T): which document each token belongs to


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


def naive_conv(conv: CausalConv1D, x: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
    """y_t = b + sum_k w[K-1-k] x_{t-k} over the taps that exist and lie in x_t's document."""
    B, T, C = x.shape
    K = conv.kernel_width
    docs = _doc_ids(seg)
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


def _rope(x: torch.Tensor, pos: torch.Tensor, rope_dim: int, base: float) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i + rope_dim/2}) by pos * base^(-2i / rope_dim), as complex numbers.
    The angles and their sine and cosine are float32, as in both references, whatever x's dtype."""
    half = rope_dim // 2
    freq = 1.0 / base ** (torch.arange(half, dtype=torch.float32) * 2 / rope_dim)
    angle = pos.float() * freq
    turn = torch.complex(torch.cos(angle).double(), torch.sin(angle).double())
    z = torch.complex(x[..., :half], x[..., half:rope_dim]) * turn
    return torch.cat([z.real, z.imag, x[..., rope_dim:]], -1)


def naive_attention(attn: Attention, x: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
    """Each query attends, with softmax(q.k / sqrt(d)), to the keys at or before it, in its
    document and at most ``history`` tokens back; RoPE by position in the document."""
    B, T, _ = x.shape
    H, Hkv, hd = attn.num_heads, attn.num_kv_heads, attn.head_dim
    q = (x @ attn.q.weight.T).view(B, T, H, hd)
    k = (x @ attn.k.weight.T).view(B, T, Hkv, hd)
    v = (x @ attn.v.weight.T).view(B, T, Hkv, hd)
    docs = _doc_ids(seg)
    out = torch.zeros(B, T, H, hd, dtype=x.dtype)
    for b in range(B):
        for t in range(T):
            seen = [
                j for j in range(t + 1) if docs[b, j] == docs[b, t] and (attn.history is None or t - j <= attn.history)
            ]
            for h in range(H):
                kv = h // (H // Hkv)
                qh = _rope(q[b, t, h], seg[b, t], attn.rope_dim, attn.rope_base)
                keys = torch.stack([_rope(k[b, j, kv], seg[b, j], attn.rope_dim, attn.rope_base) for j in seen])
                p = torch.softmax(keys @ qh / hd**0.5, 0)
                out[b, t, h] = p @ v[b, seen, kv]
    return out.flatten(2) @ attn.o.weight.T + attn.o.bias


@pytest.mark.parametrize(
    "history, heads, rope_dim", [(5, (4, 1), 8), (3, (4, 2), 4), (None, (2, 2), 8), (0, (2, 1), 8)]
)
def test_attention_matches_the_masked_softmax(history, heads, rope_dim, monkeypatch):
    monkeypatch.setattr("griffon.nn.attention._QUERY_BLOCK", 7)  # blocks that do not divide T
    torch.manual_seed(0)
    attn = Attention(width=16, num_heads=heads[0], num_kv_heads=heads[1], head_dim=8, history=history,
                     rope_dim=rope_dim, rope_base=10_000.0).double()  # fmt: skip
    with torch.no_grad():
        attn.o.bias.normal_()
    x = torch.randn(3, 23, 16, dtype=torch.float64)
    positions = torch.arange(23).expand(3, 23)
    want = naive_attention(attn, x, SEG)
    got, _ = attn(x, SEG, positions, None, build_state=False)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    state, steps = attn.init_state(3, torch.float64, x.device), []
    for t in range(23):  # the decode branch against the cache
        y, state = attn(x[:, t : t + 1], SEG[:, t : t + 1], positions[:, t : t + 1], state)
        steps.append(y)
    torch.testing.assert_close(torch.cat(steps, 1), want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("semantics, reach", [("deepmind", 4), ("hf", 3)])
def test_a_local_attention_model_sees_exactly_its_window(semantics, reach):
    """Perturb one token of a one-layer attention model: exactly the logits of the tokens that
    may see it change (itself and the next ``reach``, within its document)."""
    cfg = ModelConfig(vocab_size=32, width=16, num_layers=1, block_pattern=("attention",), num_heads=2,
                      attention_window=4, window_semantics=semantics, mlp_width=32)  # fmt: skip
    model = Griffon(cfg).eval()
    tokens = torch.randint(0, 32, (1, 20))
    seg = _doc_positions(20, [12])[None]
    with torch.no_grad():
        base, _ = model(tokens, seg)
        for j in (2, 9, 11):
            changed = tokens.clone()
            changed[0, j] = (changed[0, j] + 1) % 32
            moved = ((model(changed, seg)[0] - base).abs().amax(-1) > 1e-6)[0]
            expect = torch.zeros(20, dtype=torch.bool)
            expect[j : min(j + reach + 1, 12 if j < 12 else 20)] = True
            assert torch.equal(moved, expect), (j, moved.nonzero().flatten().tolist())


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
