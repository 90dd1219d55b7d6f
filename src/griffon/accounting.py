"""Exact parameter and memory accounting from a config, without building the model."""

from __future__ import annotations

import torch

from griffon.config import ModelConfig


def decode_state_bytes(cfg: ModelConfig, seq_len: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of decode state one sequence holds after ``seq_len`` tokens (what ``Cache.nbytes`` reports).

    Recurrent blocks: the RG-LRU state (float32) and the last ``conv_width - 1`` conv inputs.
    Local attention: a ring of ``history`` keys and values plus their positions (int64). Global
    attention: every key and value seen. Only global attention depends on ``seq_len``.
    """
    item = torch.empty(0, dtype=dtype).element_size()
    lru = cfg.resolved_lru_width
    kv = cfg.num_kv_heads * cfg.resolved_head_dim
    total = 16  # the cache's position and segment_pos counters (int64 each)
    for kind in cfg.block_types:
        if kind == "recurrent":
            total += lru * 4 + (cfg.conv_width - 1) * lru * item
        else:
            slots = seq_len if cfg.attention_history is None else cfg.attention_history
            total += slots * (2 * kv * item + 8)
    return total


def mean_visible_keys(cfg: ModelConfig, seq_len: int) -> float:
    """Average number of keys a query attends to over a sequence of ``seq_len`` (one document)."""
    h = cfg.attention_history
    if h is None or h >= seq_len - 1:
        return (seq_len + 1) / 2
    # queries t < h see t + 1 keys; the rest see h + 1
    return (h * (h + 1) / 2 + (seq_len - h) * (h + 1)) / seq_len


def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> dict[str, float]:
    """Forward FLOPs per token by component (a multiply-add counts 2).

    ``matmul``: every weight matrix, including the block-diagonal gates and the tied output head
    (not the embedding lookup). ``attention``: scores and weighted sum over the keys each query
    really sees (window and causality taken into account, not the full square). ``conv``: the
    depthwise Conv1D. Elementwise work (norms, gates, the scan) is left out here.
    """
    D, L, E = cfg.width, cfg.resolved_lru_width, cfg.resolved_mlp_width
    q_dim, kv_dim = cfg.num_heads * cfg.resolved_head_dim, cfg.num_kv_heads * cfg.resolved_head_dim
    matmul_weights = cfg.vocab_size * D
    attention = conv = 0.0
    for kind in cfg.block_types:
        matmul_weights += 3 * D * E
        if kind == "recurrent":
            matmul_weights += 3 * D * L + 2 * L * L // cfg.resolved_lru_num_blocks
            conv += 2 * cfg.conv_width * L
        else:
            matmul_weights += 2 * D * q_dim + 2 * D * kv_dim
            attention += 4 * q_dim * mean_visible_keys(cfg, seq_len)
    matmul = 2.0 * matmul_weights
    return {"matmul": matmul, "attention": attention, "conv": conv, "total": matmul + attention + conv}


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward + backward FLOPs per token: three times the forward (the usual 6N convention)."""
    return 3.0 * forward_flops_per_token(cfg, seq_len)["total"]
