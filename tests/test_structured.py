"""Structured FFN layers: dense equivalence (values and gradients), shuffles, pre-merge, config,
models that use them, and the parameter/FLOP accounting against the published figures."""

import json

import pytest
import torch

from griffon.accounting import ffn_params, forward_flops_per_token, linear_params, structuredffn_counts
from griffon.cli import main
from griffon.config import ConfigError, LinearStructure, ModelConfig
from griffon.decode import calibrate_merge_thresholds, generate
from griffon.model import Griffon
from griffon.nn.structured import (
    BlockDenseLinear,
    BlockShuffleLinear,
    LowRankLinear,
    StructuredLinear,
)
from griffon.presets import get_preset

# Odd shapes: sizes that are not powers of two, in < out and in > out.
LAYERS = {
    "lowrank-up": lambda: LowRankLinear(15, 33, rank=7),
    "lowrank-down": lambda: LowRankLinear(33, 15, rank=15),
    "blockshuffle-up": lambda: BlockShuffleLinear(12, 21, blocks=3),
    "blockshuffle-down": lambda: BlockShuffleLinear(21, 12, blocks=3),
    "blockdense-up": lambda: BlockDenseLinear(12, 35, blocks=4, rank=8),
    "blockdense-down": lambda: BlockDenseLinear(35, 12, blocks=5, rank=10),
}


@pytest.fixture(params=sorted(LAYERS))
def layer(request) -> StructuredLinear:
    torch.manual_seed(0)
    lin = LAYERS[request.param]().double()
    with torch.no_grad():
        lin.bias.normal_()
    return lin


def test_forward_and_gradients_equal_the_dense_equivalent(layer):
    x = torch.randn(3, 7, layer.in_features, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 7, layer.out_features, dtype=torch.float64)

    y = layer(x)
    (y * g).sum().backward()
    grads = [p.grad.clone() for p in layer.factors()] + [x.grad.clone()]
    for p in [*layer.factors(), x]:
        p.grad = None

    dense = x @ layer.to_dense().T + layer.bias  # gradients flow through to_dense() into the factors
    (dense * g).sum().backward()
    torch.testing.assert_close(y, dense, rtol=0, atol=1e-12)
    for got, want in zip(grads, [p.grad for p in layer.factors()] + [x.grad], strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert sum(p.numel() for p in layer.factors()) == linear_params(
        layer.in_features, layer.out_features, _structure_of(layer)
    )


def _structure_of(layer: StructuredLinear) -> LinearStructure:
    if isinstance(layer, LowRankLinear):
        return LinearStructure("lowrank", rank=layer.rank)
    if isinstance(layer, BlockShuffleLinear):
        return LinearStructure("blockshuffle", blocks=layer.blocks)
    return LinearStructure("blockdense", rank=layer.rank, blocks=layer.blocks)


def _monarch_reference(x, w1, w2):
    """BlockShuffle as Monarch/StructuredFFN write it: blocks, (k q) -> (r l) regrouping, blocks, (s l) output."""
    k, q, p = w1.shape
    m, s, r = w2.shape  # m blocks (Monarch's l)
    n = x.shape[0]
    out1 = torch.einsum("kqp,nkp->nkq", w1, x.reshape(n, k, p)).reshape(n, r, m).transpose(1, 2)  # (n, m, r)
    return torch.einsum("msr,nmr->nsm", w2, out1).reshape(n, s * m)


@pytest.mark.parametrize("shape", [(12, 21, 3), (21, 12, 3), (16, 64, 4), (64, 16, 2)])
def test_blockshuffle_matches_the_monarch_formulation(shape):
    torch.manual_seed(0)
    layer = BlockShuffleLinear(*shape, bias=False).double()
    x = torch.randn(11, shape[0], dtype=torch.float64)
    torch.testing.assert_close(layer(x), _monarch_reference(x, layer.w1, layer.w2), rtol=0, atol=1e-12)
    # the permutations matter: without them the dense matrix is a different function
    no_shuffle = torch.block_diag(*layer.w2.unbind(0)) @ torch.block_diag(*layer.w1.unbind(0))
    assert not torch.allclose(no_shuffle, layer.to_dense())


def test_initialisation():
    torch.manual_seed(0)
    std = 0.05
    for lin in (BlockShuffleLinear(64, 256, 4), BlockDenseLinear(64, 256, 4, 32), LowRankLinear(64, 256, 16)):
        lin.reset_parameters(std)
        if isinstance(lin, LowRankLinear):
            # the best rank-r approximation: U and V^T share the singular values
            assert torch.linalg.matrix_rank(lin.to_dense()) == 16
            torch.testing.assert_close(lin.U.norm(dim=0), lin.V.norm(dim=1), rtol=1e-4, atol=0)
            continue
        # orthogonal blocks (up to the common scale), dense-equivalent norm as a N(0, std^2) matrix
        expected = std * (64 * 256) ** 0.5
        torch.testing.assert_close(lin.to_dense().norm(), torch.tensor(expected), rtol=1e-4, atol=0)
        for blocks in (lin.w1,) if isinstance(lin, BlockDenseLinear) else (lin.w1, lin.w2):
            for b in blocks:
                gram = b @ b.T if b.shape[0] <= b.shape[1] else b.T @ b
                torch.testing.assert_close(gram / gram[0, 0], torch.eye(gram.shape[0]), atol=1e-5, rtol=0)


def test_pre_merge_agrees_with_the_structured_path_and_follows_the_threshold(layer):
    layer = layer.float()
    layer.merge_threshold = 16
    x = torch.randn(4, 8, layer.in_features)
    with torch.no_grad():
        structured = layer.forward_structured(x) + layer.bias
        for n in (1, 4, 16):
            layer._merged = None
            out = layer(x.flatten(0, 1)[:n])
            assert layer._merged is not None, f"{n} tokens should use the merged weight"
            torch.testing.assert_close(out, structured.flatten(0, 1)[:n], rtol=1e-5, atol=1e-6)
        layer._merged = None
        torch.testing.assert_close(layer(x), structured)  # 32 tokens > 16: structured path
        assert layer._merged is None
        layer(x[:1, :1])
        first = layer.merged_weight()
        layer.factors()[0].mul_(2.0)  # an in-place update invalidates the cache
        assert not torch.equal(layer.merged_weight(), first)
        torch.testing.assert_close(layer.merged_weight(), layer.to_dense())
    # with autograd on, never the merged weight (it would not train the factors)
    layer._merged = None
    layer(x[:1, :1]).sum().backward()
    assert layer._merged is None and all(p.grad is not None for p in layer.factors())


STRUCTURES = {
    "lowrank": dict(kind="lowrank", rank=16),
    "blockshuffle": dict(kind="blockshuffle", blocks=4),
    "blockdense": dict(kind="blockdense", blocks=4, rank=32),
}


@pytest.mark.parametrize("family", ["griffin", "hawk", "mqa"])
@pytest.mark.parametrize("kind", sorted(STRUCTURES))
def test_structured_models_train_and_count(family, kind):
    cfg = get_preset(f"{family}-tiny", ffn_structure=LinearStructure(**STRUCTURES[kind]))
    torch.manual_seed(0)
    model = Griffon(cfg)
    assert isinstance(model.blocks[0].mlp.up, torch.nn.Linear)  # the first FFN stays dense
    assert isinstance(model.blocks[1].mlp.up, StructuredLinear)
    mlp_params = sum(p.numel() for b in model.blocks for p in b.mlp.parameters())
    assert ffn_params(cfg) == mlp_params
    tokens = torch.randint(0, 256, (2, 40))
    logits, _ = model(tokens)
    logits.float().logsumexp(-1).mean().backward()
    assert all(p.grad is not None for p in model.parameters())

    all_structured = cfg.replace(ffn_structure=LinearStructure(**STRUCTURES[kind], keep_first_dense=False))
    assert isinstance(Griffon(all_structured).blocks[0].mlp.up, StructuredLinear)
    assert ffn_params(all_structured) < ffn_params(cfg) < ffn_params(get_preset(f"{family}-tiny"))


def test_pre_merged_generation_matches_the_structured_path():
    cfg = get_preset("griffin-tiny", ffn_structure=LinearStructure(kind="blockshuffle", blocks=4, merge_threshold=0))
    torch.manual_seed(0)
    model = Griffon(cfg).eval()
    prompts = [torch.randint(0, 256, (n,)).tolist() for n in (5, 23)]
    structured = generate(model, prompts, max_new_tokens=20, temperature=0.0)
    for m in model.modules():
        if isinstance(m, StructuredLinear):
            m.merge_threshold = 64
    merged = generate(model, prompts, max_new_tokens=20, temperature=0.0)
    assert merged == structured
    assert any(m._merged is not None for m in model.modules() if isinstance(m, StructuredLinear))


def test_calibration_sets_unset_merge_thresholds_and_generation_changes_nothing():
    cfg = get_preset("hawk-tiny", ffn_structure=LinearStructure(kind="lowrank", rank=16))
    model = Griffon(cfg)
    layers = [m for m in model.modules() if isinstance(m, StructuredLinear)]
    assert all(m.merge_threshold is None for m in layers)
    generate(model, [[1, 2, 3]], max_new_tokens=2, temperature=0.0, seed=0)
    assert all(m.merge_threshold is None for m in layers)  # generation leaves the model as it was
    rng = torch.get_rng_state()
    calibrate_merge_thresholds(model)
    assert torch.equal(torch.get_rng_state(), rng)  # calibration leaves the global RNG alone
    by_shape: dict[tuple, set] = {}
    for m in layers:  # one measurement per shape: 64 -> 192 (gate, up) and 192 -> 64 (down)
        by_shape.setdefault((m.in_features, m.out_features), set()).add(m.merge_threshold)
    assert len(by_shape) == 2 and all(len(t) == 1 for t in by_shape.values())
    assert {t for ts in by_shape.values() for t in ts} <= {0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512}
    layers[0].merge_threshold = 3  # a configured threshold is kept
    assert "blocks.1.mlp.gate" not in calibrate_merge_thresholds(model)
    assert layers[0].merge_threshold == 3


def test_gelu_mlp_and_layernorm_transformer():
    cfg = get_preset("structuredffn-s").replace(
        vocab_size=300, width=48, num_layers=2, num_heads=4, num_kv_heads=4, mlp_width=192, max_seq_len=64
    )
    model = Griffon(cfg)
    assert isinstance(model.final_norm, torch.nn.LayerNorm) and not hasattr(model.blocks[0].mlp, "gate")
    logits, _ = model(torch.randint(0, 300, (2, 20)))
    assert logits.shape == (2, 20, 300)
    assert ModelConfig.from_json(cfg.to_json()) == cfg


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(kind="sparse"), "is not one of"),
        (dict(kind="lowrank"), "rank must be a positive integer"),
        (dict(kind="lowrank", rank=8, blocks=2), "blocks does not apply"),
        (dict(kind="blockdense", rank=8), "blocks must be a positive integer"),
        (dict(kind="lowrank", rank=100), "exceeds"),
        (dict(kind="blockshuffle", blocks=5), "does not divide 64"),
        (dict(kind="blockdense", blocks=4, rank=30), "does not divide 30"),
    ],
)
def test_bad_structures_are_rejected(changes, message):
    with pytest.raises(ConfigError, match=message):
        get_preset("griffin-tiny").replace(ffn_structure=LinearStructure(**{**dict(kind="dense"), **changes}))


def test_structure_round_trips_through_json():
    cfg = get_preset("hawk-tiny", ffn_structure=LinearStructure(kind="blockdense", blocks=4, rank=32))
    assert ModelConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ConfigError, match="did you mean 'blocks'"):
        ModelConfig.from_dict({**cfg.to_dict(), "ffn_structure": {"kind": "blockdense", "block": 4}})


# ----- accounting ---------------------------------------------------------------------------------
# Table 1 of arXiv 2406.16450: Transformer-xl trained on 25.5B tokens.
TABLE_1 = [
    ([], 805.3e6, 2.102e20),
    (["kind=lowrank", "rank=1024"], 515.9e6, 1.660e20),
    (["kind=blockdense", "blocks=4", "rank=1536"], 485.8e6, 1.614e20),
    (["kind=blockshuffle", "blocks=2"], 515.9e6, 1.660e20),
    (["kind=lowrank", "rank=512"], 274.7e6, 1.291e20),
    (["kind=blockdense", "blocks=4", "rank=768"], 259.7e6, 1.268e20),
    (["kind=blockshuffle", "blocks=4"], 274.7e6, 1.291e20),
]


@pytest.mark.parametrize("sets, ffn, flops", TABLE_1)
def test_structuredffn_table_1_figures(sets, ffn, flops, capsys):
    argv = ["info", "structuredffn-xl", "--json", "--convention", "structuredffn", "--tokens", "25.5e9"]
    assert main(argv + [f"--set=ffn_structure.{s}" for s in sets]) == 0
    info = json.loads(capsys.readouterr().out)
    c = info["structuredffn"]
    assert round(c["ffn_params"] / 1e5) == round(ffn / 1e5)
    assert f"{c['train_flops']:.3e}" == f"{flops:.3e}"
    for key in ("params", "params_non_embedding", "ffn_params", "train_flops_per_token"):
        assert key in info


@pytest.mark.parametrize("size, tokens, params, flops", [
    ("s", 2.2e9, 109.5e6, 1.695e18), ("m", 6.7e9, 334.8e6, 1.548e19), ("l", 14.58e9, 728.6e6, 7.034e19),
])  # fmt: skip
def test_structuredffn_dense_totals(size, tokens, params, flops):
    c = structuredffn_counts(get_preset(f"structuredffn-{size}"), 1024, tokens)
    assert round(c["params"] / 1e5) == round(params / 1e5)
    assert f"{c['train_flops']:.3e}" == f"{flops:.3e}"


def test_native_flops_count_structured_matmuls_and_the_recurrence():
    dense = get_preset("griffin-tiny")
    low = dense.replace(ffn_structure=LinearStructure(kind="lowrank", rank=16))
    d, s = forward_flops_per_token(dense, 64), forward_flops_per_token(low, 64)
    D, E = dense.width, dense.resolved_mlp_width
    saved_per_layer = 3 * (D * E - 16 * (D + E))
    assert d["matmul"] - s["matmul"] == 2 * saved_per_layer * (dense.num_layers - 1)
    assert s["recurrence"] == d["recurrence"] > 0 and s["attention"] == d["attention"]
    assert forward_flops_per_token(get_preset("mqa-tiny"), 64)["recurrence"] == 0
