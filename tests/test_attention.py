"""Attention against a masked softmax written out per query, and a one-layer model's exact reach."""

import pytest
import torch

from griffon import Griffon
from griffon.config import ModelConfig
from griffon.nn.attention import Attention

from segments import SEG, doc_ids, doc_positions


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
    docs = doc_ids(seg)
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


@pytest.mark.parametrize("history, heads", [(5, (4, 1)), (None, (2, 2)), (0, (2, 1)), (40, (4, 2))])
def test_flex_attention_matches_the_masked_softmax(history, heads):
    """The GPU's FlexAttention path (its eager reference on the CPU, forward only): same visibility rule."""
    torch.manual_seed(0)
    attn = Attention(width=16, num_heads=heads[0], num_kv_heads=heads[1], head_dim=8, history=history,
                     rope_dim=8, rope_base=10_000.0).double()  # fmt: skip
    attn.kernel = "flex"
    x = torch.randn(3, 23, 16, dtype=torch.float64)
    positions = torch.arange(23).expand(3, 23)
    with torch.no_grad():  # FlexAttention has no backward on the CPU
        got, state = attn(x, SEG, positions, None)
        want = naive_attention(attn, x, SEG)
        attn.kernel = "blocks"
        _, want_state = attn(x, SEG, positions, None)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    for name in ("keys", "values", "positions"):
        assert torch.equal(getattr(state, name), getattr(want_state, name))


def test_sdpa_causal_kernel_needs_one_document_per_row():
    attn = Attention(width=16, num_heads=2, num_kv_heads=1, head_dim=8, history=None, rope_dim=8,
                     rope_base=10_000.0).double()  # fmt: skip
    attn.kernel = "sdpa-causal"
    x = torch.randn(2, 23, 16, dtype=torch.float64)
    positions = torch.arange(23).expand(2, 23)
    got, _ = attn(x, positions, positions, None, build_state=False)
    torch.testing.assert_close(got, naive_attention(attn, x, positions), rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="one document per row"):
        attn(x, SEG[:2], positions, None)


@pytest.mark.parametrize("semantics, reach", [("deepmind", 4), ("hf", 3)])
def test_a_local_attention_model_sees_exactly_its_window(semantics, reach):
    """Perturb one token of a one-layer attention model: exactly the logits of the tokens that
    may see it change (itself and the next ``reach``, within its document)."""
    cfg = ModelConfig(vocab_size=32, width=16, num_layers=1, block_pattern=("attention",), num_heads=2,
                      attention_window=4, window_semantics=semantics, mlp_width=32)  # fmt: skip
    model = Griffon(cfg).eval()
    tokens = torch.randint(0, 32, (1, 20))
    seg = doc_positions(20, [12])[None]
    with torch.no_grad():
        base, _ = model(tokens, seg)
        for j in (2, 9, 11):
            changed = tokens.clone()
            changed[0, j] = (changed[0, j] + 1) % 32
            moved = ((model(changed, seg)[0] - base).abs().amax(-1) > 1e-6)[0]
            expect = torch.zeros(20, dtype=torch.bool)
            expect[j : min(j + reach + 1, 12 if j < 12 else 20)] = True
            assert torch.equal(moved, expect), (j, moved.nonzero().flatten().tolist())
