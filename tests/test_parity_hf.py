"""griffon vs HF transformers RecurrentGemmaForCausalLM (fp32, random weights).

HF's Conv1d mixes packed documents, so its parity tests use one document per row; griffon's
document handling is checked against the DeepMind port instead (test_parity_deepmind.py).
"""

import pytest
import torch

from griffon.config import ModelConfig

from oracles import hf_pair

TOL = 1e-4

CONFIGS = {
    # lru_width != width; pattern ends with attention; GQA (4 query heads, 2 kv heads).
    "griffin-gqa-lru": ModelConfig(vocab_size=97, width=64, num_layers=3, num_heads=4, num_kv_heads=2, lru_width=96, mlp_width=160, attention_window=8, window_semantics="hf"),
    # MQA, 4 layers (R R A R).
    "griffin-mqa": ModelConfig(vocab_size=97, width=48, num_layers=4, num_heads=2, num_kv_heads=1, mlp_width=96, attention_window=6, window_semantics="hf"),
    "hawk": ModelConfig(vocab_size=97, width=32, num_layers=2, block_pattern=("recurrent",), num_heads=2, num_kv_heads=2, attention_window=8, window_semantics="hf"),
}  # fmt: skip


def _hf_logits(ref, tokens, **kw):
    return ref(input_ids=tokens, **kw).logits


@pytest.mark.parametrize("name", CONFIGS)
def test_full_forward(name):
    ref, ours = hf_pair(CONFIGS[name])
    tokens = torch.randint(0, 97, (2, 27))
    with torch.no_grad():
        want = _hf_logits(ref, tokens, use_cache=False)
        got, _ = ours(tokens)
    assert (got - want).abs().max() <= TOL


@pytest.mark.parametrize("name", CONFIGS)
def test_prefill_then_decode_and_caches(name):
    """HF prefills a prompt longer than the window then decodes token by token; states must agree."""
    cfg = CONFIGS[name]
    ref, ours = hf_pair(cfg)
    B, P, T = 2, 11, 24
    tokens = torch.randint(0, 97, (B, T))
    from transformers import DynamicCache

    past = DynamicCache(config=ref.config)
    # HF cannot build an attention mask for a cache without attention layers (Hawk); none is needed.
    no_mask = {"attention_mask": {"sliding_attention": None}} if "attention" not in cfg.block_types else {}
    with torch.no_grad():
        out = ref(
            input_ids=tokens[:, :P], position_ids=torch.arange(P)[None], past_key_values=past, use_cache=True, **no_mask
        )
        got, cache = ours(tokens[:, :P], return_cache=True)
        assert (got - out.logits).abs().max() <= TOL
        for t in range(P, T):
            pos = torch.full((B, 1), t)
            out = ref(input_ids=tokens[:, t : t + 1], position_ids=pos, past_key_values=past, use_cache=True, **no_mask)
            got, cache = ours(tokens[:, t : t + 1], cache=cache)
            assert (got - out.logits).abs().max() <= TOL, f"step {t}"
    for i, layer in enumerate(ref.model.layers):
        if cfg.block_types[i] == "recurrent":
            blk = layer.temporal_block
            assert (cache.blocks[i].rglru - blk.rg_lru.recurrent_states).abs().max() <= TOL
            assert (cache.blocks[i].conv - blk.conv1d_state.transpose(1, 2)).abs().max() <= TOL


@pytest.mark.parametrize("name", CONFIGS)
def test_chunked_prefill_matches_hf_forward(name):
    ref, ours = hf_pair(CONFIGS[name])
    tokens = torch.randint(0, 97, (2, 30))
    with torch.no_grad():
        want = _hf_logits(ref, tokens, use_cache=False)
        cache, outs = ours.init_cache(2), []
        for a, b in [(0, 5), (5, 6), (6, 19), (19, 30)]:
            logits, cache = ours(tokens[:, a:b], cache=cache)
            outs.append(logits)
    assert (torch.cat(outs, 1) - want).abs().max() <= TOL
