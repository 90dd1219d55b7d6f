"""The StructuredFFN papers' recipe: GPT-2 initialisation, q/k/v biases, AdamW decaying every
parameter, warmup as a fraction of the run; and the ``structuredffn-*`` recipes' settings."""

import json
import math

import pytest
import torch

from griffon import Griffon, get_preset
from griffon.config import ConfigError, LinearStructure
from griffon.nn.structured import BlockDenseLinear, LowRankLinear
from griffon.train.config import OptimConfig, TrainConfig
from griffon.train.optim import lr_at, param_groups


def _gpt2_model(kind, **structure):
    torch.manual_seed(0)
    cfg = get_preset("griffin-tiny").replace(
        init="gpt2", qkv_bias=True, ffn_structure=LinearStructure(kind=kind, keep_first_dense=False, **structure)
    )
    return Griffon(cfg)


@pytest.mark.parametrize("kind, structure", [("lowrank", {"rank": 16}), ("blockdense", {"blocks": 2, "rank": 32})])
def test_gpt2_initialisation(kind, structure):
    model = _gpt2_model(kind, **structure)
    for name, p in model.named_parameters():
        if name.endswith("bias") and "conv" not in name:
            assert torch.count_nonzero(p) == 0, name
        elif name.endswith("weight") and "conv" not in name and p.numel() >= 1024:
            assert p.std().item() == pytest.approx(0.02, rel=0.1), name
    assert model.blocks[2].temporal.q.bias is not None  # the attention block has q/k/v biases
    for layer in model.modules():
        if isinstance(layer, LowRankLinear):  # the SVD of an N(0, 0.02^2) draw: its norm, rank-truncated
            full = 0.02 * math.sqrt(layer.in_features * layer.out_features)
            assert 0.3 * full < layer.to_dense().norm().item() < full
        if isinstance(layer, BlockDenseLinear):  # orthogonal factors, unit singular values
            assert torch.linalg.svdvals(layer.w2).allclose(torch.ones(1), atol=1e-5)
            assert torch.linalg.svdvals(layer.w1).allclose(torch.ones(1), atol=1e-5)


def test_default_initialisation_is_unchanged_by_the_option():
    torch.manual_seed(0)
    a = Griffon(get_preset("griffin-tiny"))
    torch.manual_seed(0)
    b = Griffon(get_preset("griffin-tiny", init="griffin"))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_qkv_biases_reach_the_output_and_the_fast_paths_refuse_them():
    from griffon.checkpoint.convert import ConversionError, config_to_hf
    from griffon.decode.fused import FusedDecoder

    model = _gpt2_model("lowrank", rank=16).eval()
    tokens = torch.randint(0, 256, (1, 20))
    with torch.no_grad():
        before = model(tokens)[0]
        model.blocks[2].temporal.k.bias.add_(1.0)
        assert not torch.allclose(model(tokens)[0], before)
    assert "biases" in FusedDecoder.reason(model)
    with pytest.raises(ConversionError, match="qkv_bias"):
        config_to_hf(model.config)
    with pytest.raises(ConfigError, match="init 'xavier'"):
        get_preset("griffin-tiny", init="xavier")


def test_decay_every_parameter_or_matrices_only():
    model = Griffon(get_preset("griffin-tiny"))
    (everything,) = param_groups(model, 0.1, "all")
    assert len(everything["params"]) == len(list(model.parameters())) and everything["weight_decay"] == 0.1
    matrices, exempt = param_groups(model, 0.1)
    assert any(p is model.embed.weight for p in exempt["params"]) and exempt["weight_decay"] == 0.0
    with pytest.raises(ConfigError, match="optim.decay"):
        TrainConfig(optim=OptimConfig(decay="some"))


def test_warmup_fraction_of_the_planned_steps():
    cfg = OptimConfig(lr=1.0, warmup_fraction=0.1, min_lr_ratio=0.1, warmup_steps=3)
    assert [lr_at(s, 200, cfg) for s in (0, 9, 19)] == pytest.approx([1 / 20, 10 / 20, 1.0])
    assert lr_at(199, 200, cfg) == pytest.approx(0.1, abs=1e-3)
    # the papers' scheduler: cosine from the end of warmup to 0.1x at the last step
    assert lr_at(110, 200, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 90 / 180)))


@pytest.mark.parametrize(
    "size, lr, tokens, width", [("s", 6e-4, 2.2e9, 768), ("m", 3e-4, 6.7e9, 1024), ("l", 2.5e-4, 14.58e9, 1536),
                                ("xl", 2e-4, 25.5e9, 2048)],
)  # fmt: skip
def test_structuredffn_recipes(size, lr, tokens, width):
    from griffon.train.recipes import get_recipe

    cfg = get_recipe(f"structuredffn-{size}")
    assert (cfg.optim.lr, cfg.max_tokens, cfg.model.width) == (lr, tokens, width)
    assert (cfg.optim.weight_decay, cfg.optim.decay, cfg.optim.beta1, cfg.optim.beta2) == (0.1, "all", 0.9, 0.999)
    assert (cfg.optim.warmup_fraction, cfg.optim.min_lr_ratio, cfg.optim.grad_clip) == (0.1, 0.1, 1.0)
    assert cfg.data.seq_len * cfg.data.batch_size * cfg.data.grad_accum == 512 * 1024
    assert cfg.model.init == "gpt2" and cfg.model.init_std == 0.02 and cfg.model.qkv_bias


def test_train_starts_from_a_recipe(tmp_path):
    from griffon.cli import main

    out = tmp_path / "run"
    argv = ["train", "structuredffn-s", "--out", str(out), "--set", "model=mqa-tiny", "--set", "max_tokens=128",
            "--set", "data.seq_len=32", "--set", "data.batch_size=2", "--set", "data.grad_accum=1",
            "--set", "eval_every=100", "--set", "final_eval_batches=1"]  # fmt: skip
    assert main(argv) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["optim"]["decay"] == "all" and saved["optim"]["beta2"] == 0.999 and saved["max_tokens"] == 128


GUIDED = {  # StructuredFFN's experiment/sgd.sh: the guided fraction of each self-guided run at 32%
    ("lowrank", "s"): 0.30, ("lowrank", "m"): 0.38, ("lowrank", "l"): 0.41, ("lowrank", "xl"): 0.43,
    ("blockshuffle", "s"): 0.30, ("blockshuffle", "m"): 0.38, ("blockshuffle", "l"): 0.41, ("blockshuffle", "xl"): 0.43,
    ("blockdense", "s"): 0.30, ("blockdense", "m"): 0.40, ("blockdense", "l"): 0.41, ("blockdense", "xl"): 0.45,
}  # fmt: skip


@pytest.mark.parametrize("kind, size", GUIDED)
def test_self_guided_recipes_are_the_papers_runs(kind, size):
    from griffon.accounting import ffn_matmul_params
    from griffon.train.recipes import get_recipe

    cfg = get_recipe(f"structuredffn-{size}-{kind}32-guided")
    dense = get_recipe(f"structuredffn-{size}")
    sg = cfg.self_guided
    assert (sg.enabled, sg.fraction, sg.mode, sg.reduce_flop, sg.extra_steps_data) == (
        True, GUIDED[kind, size], "fixed_flops", True, "reread",
    )  # fmt: skip
    assert cfg.model.ffn_structure.kind == kind and cfg.model.ffn_structure.keep_first_dense
    assert cfg.model.replace(ffn_structure=LinearStructure()) == dense.model  # all else is the dense recipe's
    assert (cfg.optim, cfg.data, cfg.max_tokens) == (dense.optim, dense.data, dense.max_tokens)
    # a structured layer keeps 29-32% of the dense FFN's weights (the papers' "32%" settings)
    share = ffn_matmul_params(cfg.model, 1) / ffn_matmul_params(dense.model, 1)
    assert 0.28 < share < 0.33, share
    assert TrainConfig.from_dict(json.loads(cfg.to_json())) == cfg
