"""Config validation, JSON round trips, presets and their published parameter counts."""

import json

import pytest
import torch

from griffon import ConfigError, Griffon, ModelConfig, get_preset, preset_names


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_round_trips_through_json(name, tmp_path):
    cfg = get_preset(name)
    path = tmp_path / "c.json"
    cfg.to_json(path)
    assert ModelConfig.from_json(path) == cfg
    assert ModelConfig.from_json(cfg.to_json()) == cfg


def test_block_pattern_cycles():
    cfg = ModelConfig(num_layers=5)
    assert cfg.block_types == ["recurrent", "recurrent", "attention", "recurrent", "recurrent"]
    assert get_preset("hawk-tiny").block_types == ["recurrent"] * 3


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(widht=3), "unknown model config key 'widht' (did you mean 'width'?)"),
        (dict(width=100, num_heads=3), "width 100 is not divisible by num_heads 3"),
        (dict(num_heads=4, num_kv_heads=3), "num_heads 4 is not divisible by num_kv_heads 3"),
        (dict(block_pattern=["recurrent", "mamba"]), "block_pattern entry 'mamba'"),
        (dict(width="256"), "width must be of type int"),
        (dict(attention_window=0), "attention_window must be positive"),
        (dict(window_semantics="jax"), "window_semantics 'jax'"),
        (dict(lru_width=102), "lru_width 102 is not divisible"),
        (dict(rope_fraction=0.3), "must be even"),
        (dict(embed_scale="yes"), "embed_scale must be of type bool"),
        (dict(block_pattern=[]), "block_pattern must not be empty"),
    ],
)
def test_invalid_configs_name_the_problem(changes, message):
    d = ModelConfig().to_dict() | changes
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_dict(d)
    assert message in str(e.value)


def test_bad_json_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        ModelConfig.from_json(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{oops")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_json(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text(json.dumps([1]))
    with pytest.raises(ConfigError, match="JSON object"):
        ModelConfig.from_json(tmp_path / "list.json")


def test_unknown_preset_suggests():
    with pytest.raises(ConfigError, match="did you mean 'griffin-tiny'"):
        get_preset("grifin-tiny")


# Totals and non-embedding counts of these configurations as the reference package (DeepMind's
# recurrentgemma) defines them: the Griffin and Hawk 7B of arXiv 2402.19427, RecurrentGemma 2B and 9B.
@pytest.mark.parametrize(
    "name, total, non_embedding",
    [
        ("griffin-paper-7b", 7.795e9, 6.747e9),
        ("hawk-paper-7b", 8.162e9, 7.113e9),
        ("recurrentgemma-2b", 2.683e9, 2.028e9),
        ("recurrentgemma-9b", 8.580e9, 7.531e9),
    ],
)
def test_published_parameter_counts(name, total, non_embedding):
    with torch.device("meta"):
        model = Griffon(get_preset(name))
    assert model.num_params() == pytest.approx(total, abs=0.5e6)
    assert model.num_params(non_embedding=True) == pytest.approx(non_embedding, abs=0.5e6)


# The Griffin paper's scaling study (arXiv 2402.19427, Table 2): D, D_RNN, depth, heads, tokens.
PAPER_LADDER = {
    "100m": (768, 1024, 12, 6, 1.9e9),
    "200m": (1024, 1536, 12, 8, 3.9e9),
    "400m": (1536, 2048, 12, 12, 7.8e9),
    "1.3b": (2048, 2560, 24, 16, 25e9),
    "3b": (3072, 4096, 24, 24, 60e9),
    "7b": (4096, 5632, 32, 32, 132.5e9),
    "14b": (5120, 8192, 40, 40, 300e9),
}


# Griffin's total and non-embedding parameters on each rung, as docs/scaling.md's table gives them.
LADDER_GRIFFIN_PARAMS = {
    "100m": (114e6, 89.3e6),
    "200m": (196e6, 163e6),
    "400m": (404e6, 355e6),
    "1.3b": (1.31e9, 1.24e9),
    "3b": (2.93e9, 2.83e9),
    "7b": (6.92e9, 6.79e9),
    "14b": (13.9e9, 13.8e9),
}


def _params_from_the_equations(cfg):
    """Parameters of a Griffin-family model counted from its definition, layer by layer."""
    D, R, M, V = cfg.width, cfg.resolved_lru_width, cfg.resolved_mlp_width, cfg.vocab_size
    hd, blocks = cfg.resolved_head_dim, cfg.resolved_lru_num_blocks
    recurrent = 2 * (D * R + R) + cfg.conv_width * R + R + R + 2 * (R * R // blocks + R) + R * D + D
    attention = D * cfg.num_heads * hd + 2 * D * cfg.num_kv_heads * hd + cfg.num_heads * hd * D + D
    mlp = 2 * (D * M + M) + M * D + D
    layers = sum((recurrent if kind == "recurrent" else attention) + mlp + 2 * D for kind in cfg.block_types)
    return V * D + layers + D


@pytest.mark.parametrize("size", PAPER_LADDER)
def test_ladder_is_the_papers(size):
    from griffon.presets import preset_tokens

    D, D_rnn, depth, heads, tokens = PAPER_LADDER[size]
    nominal = float(size[:-1]) * (1e6 if size.endswith("m") else 1e9)
    for family in ("griffin", "hawk", "mqa"):
        cfg = get_preset(f"{family}-{size}")
        assert (cfg.width, cfg.resolved_lru_width, cfg.num_layers, cfg.num_heads) == (D, D_rnn, depth, heads)
        # the paper's model: 16 gate blocks (Section 4.1), no embedding scale, no logit soft cap
        assert cfg.resolved_lru_num_blocks == 16 and not cfg.embed_scale and cfg.logit_soft_cap == 0.0
        assert cfg.resolved_head_dim == 128 and cfg.resolved_mlp_width == 3 * D and cfg.num_kv_heads == 1
        assert cfg.attention_window == (None if family == "mqa" else 1024)
        assert preset_tokens(f"{family}-{size}") == tokens
        with torch.device("meta"):
            model = Griffon(cfg)
        assert model.num_params() == _params_from_the_equations(cfg)
        if family == "griffin":  # with a 32k vocabulary the totals land on the sizes' names
            assert 0.85 * nominal <= model.num_params() <= 1.2 * nominal
            total, body = LADDER_GRIFFIN_PARAMS[size]  # as docs/scaling.md gives them
            assert model.num_params() == pytest.approx(total, rel=5e-3)
            assert model.num_params(non_embedding=True) == pytest.approx(body, rel=5e-3)


@pytest.mark.parametrize("name", ["griffin-small", "hawk-tiny", "mqa-tiny", "griffin-100m"])
def test_matmul_flops_count_every_weight_matrix(name):
    from griffon.accounting import forward_flops_per_token

    cfg = get_preset(name)
    with torch.device("meta"):
        model = Griffon(cfg)
    # every matrix (2-D or blockwise 3-D) except the conv taps; the embedding counts once, as the head
    matrices = sum(
        p.numel() for n, p in model.named_parameters() if p.dim() >= 2 and "conv" not in n and "bias" not in n
    )
    assert forward_flops_per_token(cfg, 512)["matmul"] == 2 * matrices


def test_decode_state_bytes_match_the_cache():
    from griffon.accounting import decode_state_bytes

    for name in ["griffin-tiny", "hawk-tiny", "mqa-tiny"]:
        cfg = get_preset(name)
        model = Griffon(cfg).to(torch.bfloat16)
        _, cache = model(torch.randint(0, 256, (1, 40)), return_cache=True)
        assert cache.nbytes() == decode_state_bytes(cfg, 40, torch.bfloat16)


def test_mean_visible_keys():
    from griffon.accounting import mean_visible_keys

    cfg = ModelConfig(attention_window=2)  # a query sees itself and 2 previous keys
    assert mean_visible_keys(cfg, 5) == pytest.approx((1 + 2 + 3 + 3 + 3) / 5)
    assert mean_visible_keys(ModelConfig(attention_window=None), 5) == 3.0
