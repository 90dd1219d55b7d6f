"""Exact parameter and memory accounting from a config, without building the model."""

from __future__ import annotations

import dataclasses

import torch

from griffon.config import ConfigError, LinearStructure, ModelConfig


def param_counts(cfg: ModelConfig) -> tuple[int, int]:
    """The parameters of a model of ``cfg``, all and non-embedding, counted on a model built on the
    meta device (no memory): the count every command and planner uses. A mixture of experts is
    counted at ``top_k`` and ``top_k + 1`` experts and extended linearly (exact: every routed expert
    and router row is the same size), so a config of thousands of experts costs no more to count
    than one of a few, whose modules alone would take gigabytes of host memory and minutes."""
    moe = cfg.moe
    if moe.enabled and moe.num_experts > moe.top_k + 1:  # type: ignore[operator]
        k = moe.top_k
        low, high = (param_counts(cfg.replace(moe=dataclasses.replace(moe, num_experts=n))) for n in (k, k + 1))
        extra = moe.num_experts - k  # type: ignore[operator]
        return low[0] + extra * (high[0] - low[0]), low[1] + extra * (high[1] - low[1])
    from griffon.model import Griffon  # here: accounting works from configs; only this count needs a model

    with torch.device("meta"):
        model = Griffon(cfg)
    return model.num_params(), model.num_params(non_embedding=True)


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


def linear_params(in_features: int, out_features: int, structure: LinearStructure) -> int:
    """Weight parameters (no bias) of an ``in -> out`` layer of kind ``structure`` (= its forward
    multiply-adds per token)."""
    s = structure
    if s.kind == "dense":
        return in_features * out_features
    if s.kind == "lowrank":
        return s.rank * (in_features + out_features)  # type: ignore[operator]
    if s.kind == "blockshuffle":
        q = min(in_features, out_features) // s.blocks  # type: ignore[operator]
        return q * (in_features + out_features)
    return s.rank * in_features // s.blocks + out_features * s.rank  # type: ignore[operator]


def mlp_matmul_params(cfg: ModelConfig, layer: int, expanded: int) -> int:
    """Weight parameters (no biases) of one MLP of layer ``layer`` expanding to ``expanded``."""
    D, structure = cfg.width, cfg.ffn_structure_of(layer)
    n_in = 2 if cfg.gated_mlp else 1  # gate and up, or up alone
    return n_in * linear_params(D, expanded, structure) + linear_params(expanded, D, structure)


def ffn_matmul_params(cfg: ModelConfig, layer: int, active: bool = True) -> int:
    """Weight parameters (no biases) of layer ``layer``'s FFN projections. For a mixture of
    experts: the router, the shared experts and the ``top_k`` experts a token uses (``active``,
    what its FLOPs are counted from) or every routed expert (not ``active``: what it holds)."""
    moe = cfg.moe
    if not moe.enabled:
        return mlp_matmul_params(cfg, layer, cfg.resolved_mlp_width)
    H = cfg.resolved_expert_width
    routed = moe.top_k if active else moe.num_experts
    shared = mlp_matmul_params(cfg, layer, H * moe.shared_experts) if moe.shared_experts else 0
    return cfg.width * moe.num_experts + routed * mlp_matmul_params(cfg, layer, H) + shared  # type: ignore[operator]


def mlp_bias_params(cfg: ModelConfig, expanded: int) -> int:
    """Biases of one MLP expanding to ``expanded``."""
    if not cfg.proj_bias:
        return 0
    return (2 if cfg.gated_mlp else 1) * expanded + cfg.width


def active_params(cfg: ModelConfig) -> int:
    """Parameters a token uses: all of the model's less the routed experts it is not sent to
    (equal to the total for a dense FFN)."""
    moe = cfg.moe
    total = param_counts(cfg)[0]
    if not moe.enabled:
        return total
    H = cfg.resolved_expert_width
    idle = moe.num_experts - moe.top_k  # type: ignore[operator]
    return total - sum(idle * (mlp_matmul_params(cfg, i, H) + mlp_bias_params(cfg, H)) for i in range(cfg.num_layers))


def self_guided_flops_per_token(cfg: ModelConfig) -> float:
    """Extra training FLOPs per token while self-guided training's dense guides run
    (:mod:`griffon.train.self_guided`): each structured FFN projection has a dense guide of its
    full shape, costing 2 FLOPs per weight forward and 4 backward (input and weight gradients)."""
    dense = cfg.replace(ffn_structure=LinearStructure())
    guided = [i for i in range(cfg.num_layers) if cfg.ffn_structure_of(i).is_structured()]
    return 6.0 * sum(ffn_matmul_params(dense, i) for i in guided)


def ffn_params(cfg: ModelConfig) -> int:
    """All FFN parameters of the model, biases included (what the built model holds)."""
    moe = cfg.moe
    if not moe.enabled:
        biases = mlp_bias_params(cfg, cfg.resolved_mlp_width)
    else:
        H = cfg.resolved_expert_width
        shared = mlp_bias_params(cfg, H * moe.shared_experts) if moe.shared_experts else 0
        biases = moe.num_experts * mlp_bias_params(cfg, H) + shared  # type: ignore[operator]
    return sum(ffn_matmul_params(cfg, i, active=False) + biases for i in range(cfg.num_layers))


# Elementwise FLOPs per channel and token of the RG-LRU (each add, multiply, exp, sqrt, sigmoid
# counts 1): two sigmoid gates; log_a = -8 * gate_a * softplus(a_param) (2); a = exp(log_a) (1);
# sqrt(1 - a^2) via exp(2 log_a) (4); x * gate_x * multiplier (2); h = a h + x (2).
# Plus the recurrent block's output gate y * gelu(branch) (about 8 for the tanh GeLU, 1 multiply).
RGLRU_FLOPS_PER_CHANNEL = 2 + 2 + 1 + 4 + 2 + 2
GATE_FLOPS_PER_CHANNEL = 9


def matmul_params(cfg: ModelConfig, active: bool = True) -> int:
    """Weights of every matrix multiply of a forward pass (no biases, norms or ``a_param``): the
    output head (the tied embedding, or a head of its own; the embedding lookup is none), FFN projections (structured ones as their factors;
    of a mixture of experts the router and the experts a token uses, or all with ``active=False``),
    the recurrent blocks' projections and block-diagonal gates, the attention projections."""
    D, L = cfg.width, cfg.resolved_lru_width
    q_dim, kv_dim = cfg.num_heads * cfg.resolved_head_dim, cfg.num_kv_heads * cfg.resolved_head_dim
    total = cfg.vocab_size * D
    for layer, kind in enumerate(cfg.block_types):
        total += ffn_matmul_params(cfg, layer, active)
        if kind == "recurrent":
            total += 3 * D * L + 2 * L * L // cfg.resolved_lru_num_blocks
        else:
            total += 2 * D * q_dim + 2 * D * kv_dim
    return total


def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> dict[str, float]:
    """Forward FLOPs per token by component (a multiply-add counts 2).

    ``matmul``: every weight matrix, including the block-diagonal gates, the structured FFN factors
    and the tied output head (not the embedding lookup). ``attention``: scores and weighted sum over
    the keys each query really sees (window and causality taken into account, not the full square).
    ``conv``: the depthwise Conv1D. ``recurrence``: the RG-LRU's gates and scan and the recurrent
    block's output gate (see ``RGLRU_FLOPS_PER_CHANNEL``). Norms, residual adds and the MLP
    activation are left out (a few per width channel, well under 1% of any useful model).
    """
    L, q_dim = cfg.resolved_lru_width, cfg.num_heads * cfg.resolved_head_dim
    attention = conv = recurrence = 0.0
    for kind in cfg.block_types:
        if kind == "recurrent":
            conv += 2 * cfg.conv_width * L
            recurrence += (RGLRU_FLOPS_PER_CHANNEL + GATE_FLOPS_PER_CHANNEL) * L
        else:
            attention += 4 * q_dim * mean_visible_keys(cfg, seq_len)
    matmul = 2.0 * matmul_params(cfg)
    total = matmul + attention + conv + recurrence
    return {"matmul": matmul, "attention": attention, "conv": conv, "recurrence": recurrence, "total": total}


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward + backward FLOPs per token: three times the forward (the usual 6N convention)."""
    return 3.0 * forward_flops_per_token(cfg, seq_len)["total"]


STRUCTUREDFFN_TOKENS_PER_STEP = 524288


def structuredffn_counts(cfg: ModelConfig, seq_len: int, tokens: float | None = None) -> dict[str, float]:
    """Parameters and FLOPs under the StructuredFFN papers' convention (arXiv 2406.16450, Table 1).

    Parameters are matmul weights only (no biases, norms or RG-LRU ``a_param``; the tied
    embedding counted once; of a mixture of experts every expert, and ``active_params`` those a
    token uses, from which its FLOPs are counted); forward FLOPs per token are 2 per matmul weight plus, per attention
    layer, ``2 * 2 * seq_len * attention width`` (the full causal square, not halved, window
    ignored); training is 3x forward; a run of ``tokens`` takes ``floor(tokens / 524288)`` steps of
    524288 tokens.
    """
    q_dim = cfg.num_heads * cfg.resolved_head_dim
    ffn = sum(ffn_matmul_params(cfg, i, active=False) for i in range(cfg.num_layers))
    params, active = matmul_params(cfg, active=False), matmul_params(cfg)
    attention = 4.0 * seq_len * q_dim * cfg.block_types.count("attention")
    train_per_token = 3.0 * (2.0 * active + attention)
    out: dict[str, float] = {"params": params, "ffn_params": ffn, "train_flops_per_token": train_per_token}
    if cfg.moe.enabled:
        out["active_params"] = active
    if tokens is not None:
        steps = int(tokens // STRUCTUREDFFN_TOKENS_PER_STEP)
        out.update(steps=steps, train_flops=train_per_token * steps * STRUCTUREDFFN_TOKENS_PER_STEP)
    return out


# Host bytes of one built ``nn.Module`` beyond its tensors (Python objects, parameter and hook
# dictionaries), measured on CPython 3.11 with torch 2.13: 12,082 modules of a 500-expert
# griffin-small took 192 MiB on the meta device, 16.3 KiB each; rounded up.
MODULE_HOST_BYTES = 17 * 2**10
# Of the memory free when a command starts, the share a model may plan to take.
BUILD_MEMORY_SHARE = 0.8


def module_count(cfg: ModelConfig) -> int:
    """About how many modules a model of ``cfg`` builds (what its host memory on the meta device
    grows with): a fixed few per block plus, for each MLP or expert, the MLP and its projections
    (structured projections hold their factors as modules too)."""
    projections = 3 if cfg.gated_mlp else 2
    per_mlp = 1 + projections * (3 if cfg.ffn_structure.is_structured() else 1)
    mlps = (cfg.moe.num_experts or 0) + (1 if cfg.moe.shared_experts else 0) if cfg.moe.enabled else 1
    return 8 + cfg.num_layers * (12 + mlps * per_mlp)


def build_bytes(cfg: ModelConfig, bytes_per_param: int) -> int:
    """Bytes building a model of ``cfg`` takes, estimated from the config alone: its modules'
    host memory and ``bytes_per_param`` for each of its parameters (0 on the meta device; 4 for
    float32 weights; 16 to train them with Adam: weights, gradients and two moments)."""
    params = matmul_params(cfg, active=False)
    return module_count(cfg) * MODULE_HOST_BYTES + bytes_per_param * params


def check_buildable(cfg: ModelConfig, bytes_per_param: int, free_bytes: int, what: str) -> None:
    """Refuse, with the estimate, a model whose :func:`build_bytes` passes ``BUILD_MEMORY_SHARE``
    of ``free_bytes`` (the memory free where it would be built), before building any of it."""
    need = build_bytes(cfg, bytes_per_param)
    if need > BUILD_MEMORY_SHARE * free_bytes:
        experts = f", {cfg.moe.num_experts} experts a layer" if cfg.moe.enabled else ""
        raise ConfigError(
            f"{what} needs about {need / 2**30:.1f} GiB ({matmul_params(cfg, active=False):,} weights{experts}), "
            f"more than {BUILD_MEMORY_SHARE:.0%} of the {free_bytes / 2**30:.1f} GiB free here"
        )
