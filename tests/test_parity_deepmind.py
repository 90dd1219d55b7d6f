"""griffon vs the DeepMind PyTorch port: logits, caches, decoding, chunked prefill (fp32, random weights)."""

import pytest
import torch

from griffon.checkpoint.convert import from_deepmind_state_dict
from griffon.config import ModelConfig

from oracles import deepmind_pair

TOL = 1e-4

CONFIGS = {
    # lru_width != width; 3 layers: the pattern ends with an attention block.
    "griffin-lru": ModelConfig(vocab_size=97, width=64, num_layers=3, num_heads=4, lru_width=96, mlp_width=160, attention_window=8),
    # 5 layers (R R A R R), no embedding scale, no soft cap.
    "griffin-5": ModelConfig(vocab_size=97, width=48, num_layers=5, num_heads=2, mlp_width=96, attention_window=5, embed_scale=False, logit_soft_cap=0.0),
    "hawk": ModelConfig(vocab_size=97, width=32, num_layers=2, block_pattern=("recurrent",), num_heads=2, attention_window=8),
    "local-mqa": ModelConfig(vocab_size=97, width=64, num_layers=2, block_pattern=("attention",), num_heads=4, attention_window=6),
}  # fmt: skip


def packed_positions(B: int, T: int, starts: dict[int, list[int]]) -> torch.Tensor:
    """segment_pos for rows whose documents start at the given offsets (besides 0)."""
    pos = torch.zeros(B, T, dtype=torch.long)
    for b in range(B):
        p = 0
        for t in range(T):
            p = 0 if t in starts.get(b, []) else p + (t > 0)
            pos[b, t] = p
    return pos


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("query_block", [5, 256])
def test_full_forward_with_document_boundaries(name, query_block, monkeypatch):
    monkeypatch.setattr("griffon.nn.attention._QUERY_BLOCK", query_block)  # 5: blocks shorter than the window
    cfg = CONFIGS[name]
    ref, ours = deepmind_pair(cfg)
    B, T = 3, 29  # longer than every window
    tokens = torch.randint(0, cfg.vocab_size, (B, T))
    seg = packed_positions(B, T, {0: [11], 2: [3, 20]})
    with torch.no_grad():
        want, _ = ref(tokens, seg, return_cache=False)
        got, _ = ours(tokens, seg)
    assert (got - want).abs().max() <= TOL


@pytest.mark.parametrize("name", CONFIGS)
def test_prompt_cache_matches(name):
    cfg = CONFIGS[name]
    ref, ours = deepmind_pair(cfg)
    B, T = 2, 19
    tokens = torch.randint(0, cfg.vocab_size, (B, T))
    seg = torch.arange(T).expand(B, T)
    with torch.no_grad():
        _, want = ref(tokens, seg)
        _, got = ours(tokens, seg, return_cache=True)
    for i, state in enumerate(got.blocks):
        ref_state = want[f"blocks.{i}"]
        if cfg.block_types[i] == "recurrent":
            assert (state.rglru - ref_state.rg_lru_state).abs().max() <= TOL
            assert (state.conv - ref_state.conv1d_state).abs().max() <= TOL
        else:
            assert (state.keys - ref_state.keys).abs().max() <= TOL
            assert (state.values - ref_state.values).abs().max() <= TOL
            assert torch.equal(got.position, ref_state.num_tokens.long())


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("prompt_len", [3, 13])
def test_token_by_token_decoding(name, prompt_len):
    """Prefill a prompt (shorter and longer than the window), then decode single tokens past the window."""
    cfg = CONFIGS[name]
    ref, ours = deepmind_pair(cfg)
    B, T = 2, 26
    tokens = torch.randint(0, cfg.vocab_size, (B, T))
    seg = torch.arange(T).expand(B, T)
    with torch.no_grad():
        want, ref_cache = ref(tokens[:, :prompt_len], seg[:, :prompt_len])
        got, cache = ours(tokens[:, :prompt_len], seg[:, :prompt_len], return_cache=True)
        assert (got - want).abs().max() <= TOL
        for t in range(prompt_len, T):
            want, ref_cache = ref(tokens[:, t : t + 1], seg[:, t : t + 1], cache=ref_cache)
            got, cache = ours(tokens[:, t : t + 1], cache=cache)
            assert (got - want).abs().max() <= TOL, f"step {t}"


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("query_block", [3, 256])
def test_chunked_prefill_matches_reference_forward(name, query_block, monkeypatch):
    monkeypatch.setattr("griffon.nn.attention._QUERY_BLOCK", query_block)
    """The reference cannot prefill in chunks; griffon's chunked logits must equal its full forward."""
    cfg = CONFIGS[name]
    ref, ours = deepmind_pair(cfg)
    B, T = 2, 31
    tokens = torch.randint(0, cfg.vocab_size, (B, T))
    seg = packed_positions(B, T, {1: [9, 17]})
    with torch.no_grad():
        want, _ = ref(tokens, seg, return_cache=False)
        cache, outs = ours.init_cache(B), []
        for a, b in [(0, 7), (7, 8), (8, 20), (20, 31)]:
            logits, cache = ours(tokens[:, a:b], seg[:, a:b], cache=cache)
            outs.append(logits)
    assert (torch.cat(outs, 1) - want).abs().max() <= TOL


@pytest.mark.parametrize("name", CONFIGS)
def test_gradients_match_reference_autograd(name):
    """Every parameter's gradient against the DeepMind port's autograd (document resets, T > window):
    griffon's own backward paths (the bounded-derivative sqrt, the scan's reverse pass) checked
    against an independent implementation."""
    cfg = CONFIGS[name]
    ref, ours = deepmind_pair(cfg)
    ref.train(), ours.train()
    B, T = 3, 29
    tokens = torch.randint(0, cfg.vocab_size, (B, T))
    seg = packed_positions(B, T, {0: [11], 2: [3, 20]})
    weights = torch.randn(B, T, cfg.vocab_size)  # a loss that reaches every logit differently
    (ref(tokens, seg, return_cache=False)[0] * weights).sum().backward()
    (ours(tokens, seg)[0] * weights).sum().backward()
    want = from_deepmind_state_dict({k: p.grad for k, p in ref.named_parameters()}, cfg)
    for k, p in ours.named_parameters():
        scale = want[k].abs().max()
        assert scale > 0, k
        assert (p.grad - want[k]).abs().max() <= 2e-5 * scale, k
