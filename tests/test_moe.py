"""The mixture-of-experts FFN: sorted dispatch against the masked reference (values and gradients,
uneven loads, an idle expert, every expert chosen), the balancing losses against their formulas,
the bias update, exact accounting, training, resume, decoding and bad configs."""

import json
import math
import re

import pytest
import torch

from griffon.accounting import active_params, ffn_params, forward_flops_per_token, matmul_params, param_counts
from griffon.cli import main
from griffon.config import ConfigError, LinearStructure, ModelConfig, MoEConfig
from griffon.model import Griffon
from griffon.nn.moe import MoE, balance_loss, router_loss, update_routers, z_loss
from griffon.presets import get_preset


def _layer(structure=None, shared=0, num_experts=6, top_k=2, mlp_type="geglu", seed=0):
    torch.manual_seed(seed)
    cfg = MoEConfig(num_experts=num_experts, top_k=top_k, shared_experts=shared)
    return MoE(cfg, mlp_type, 24, 40, 1.0, structure)


def _compare(layer, x, rtol=1e-5, atol=1e-6):
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = layer(x1), layer.forward_reference(x2)
    torch.testing.assert_close(y1, y2, rtol=rtol, atol=atol)
    g = torch.randn_like(y1)
    grads1 = torch.autograd.grad(y1, [x1, *layer.parameters()], g)
    grads2 = torch.autograd.grad(y2, [x2, *layer.parameters()], g)
    for a, b in zip(grads1, grads2, strict=True):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


@pytest.mark.parametrize(
    "structure, shared, mlp_type",
    [(None, 0, "geglu"), (None, 1, "gelu"), (LinearStructure("lowrank", rank=8), 2, "geglu")],
)
def test_dispatch_equals_the_masked_reference(structure, shared, mlp_type):
    layer = _layer(structure, shared, mlp_type=mlp_type)
    _compare(layer, torch.randn(3, 37, 24))  # 111 tokens: not a multiple of anything


@pytest.mark.parametrize("mlp_type", ["geglu", "gelu"])
def test_grouped_gemms_equal_the_masked_reference(mlp_type):
    """The GPU's path (``torch._grouped_mm``, which also runs on the CPU in float32), with an
    expert that gets no tokens."""
    layer = _layer(shared=1, mlp_type=mlp_type)
    layer.grouped = True
    with torch.no_grad():
        layer.expert_bias[2] = -5.0
    _compare(layer, torch.randn(2, 29, 24))
    structured = _layer(LinearStructure("lowrank", rank=8))
    structured.grouped = True
    with pytest.raises(ValueError, match="grouped GEMMs run dense experts only"):
        structured(torch.randn(4, 24))


def test_uneven_loads_and_an_expert_without_tokens():
    layer = _layer()
    with torch.no_grad():
        layer.expert_bias.copy_(torch.tensor([5.0, 0.0, 0.0, 0.0, 0.0, -5.0]))  # expert 0 always, 5 never
    x = torch.randn(50, 24)
    chosen = layer.route(x).experts
    counts = torch.bincount(chosen.reshape(-1), minlength=6)
    assert counts[0] == 50 and counts[5] == 0 and len(set(counts[1:5].tolist())) > 1
    _compare(layer, x)


def test_every_expert_chosen_is_the_dense_mixture():
    """top_k = num_experts: the output is the softmax-weighted sum of all experts, as a dense
    mixture computes it."""
    layer = _layer(num_experts=4, top_k=4)
    x = torch.randn(20, 24)
    probs = torch.softmax(x @ layer.router.weight.T, dim=-1)
    want = sum(probs[:, e, None] * expert(x) for e, expert in enumerate(layer.experts))
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-6)


def test_gates_and_the_bias_steer_only_the_choice():
    layer = _layer()
    x = torch.randn(30, 24)
    r = layer.route(x)
    torch.testing.assert_close(r.gates.sum(-1), torch.ones(30))
    top = torch.topk(r.probs, 2).indices
    assert torch.equal(r.experts, top)
    with torch.no_grad():
        layer.expert_bias[top[0, 0]] = -1.0  # the token's favourite is now out of reach
    r2 = layer.route(x)
    assert top[0, 0] not in r2.experts[0]
    gates = r2.probs[0, r2.experts[0]]  # gates are the unbiased probabilities, renormalised
    torch.testing.assert_close(r2.gates[0], gates / gates.sum())


def test_top1_gates_are_the_router_probability_so_the_task_loss_trains_the_router():
    """Switch's top-1: the gate is the chosen expert's probability (renormalising it would make it
    exactly 1, and the router would get no gradient from the task loss); top-2 renormalises as
    Mixtral; ``renormalize`` overrides the default where it means something."""
    x = torch.randn(40, 24)
    grads = {}
    for k in (1, 2):
        layer = _layer(top_k=k)
        r = layer.route(x)
        want = r.probs.gather(1, r.experts)
        torch.testing.assert_close(r.gates, want if k == 1 else want / want.sum(-1, keepdim=True))
        layer(x).square().sum().backward()  # a task loss alone: no balance or z loss (eval mode)
        grads[k] = float(layer.router.weight.grad.norm())
    assert grads[1] > 1e-3 * grads[2] and grads[1] > 1e-4
    torch.manual_seed(0)
    plain = MoE(MoEConfig(num_experts=6, top_k=2, renormalize=False), "geglu", 24, 40)
    r = plain.route(x)
    torch.testing.assert_close(r.gates, r.probs.gather(1, r.experts))
    with pytest.raises(ConfigError, match="router gets no gradient"):
        MoEConfig(num_experts=6, top_k=1, renormalize=True)


def test_balance_and_z_losses_follow_their_formulas():
    torch.manual_seed(1)
    T, E, k = 40, 5, 2
    logits = torch.randn(T, E) * 3
    probs = logits.softmax(-1)
    experts = torch.topk(probs, k).indices
    want = 0.0
    for i in range(E):
        f_i = sum(int(i in experts[t]) for t in range(T)) / (T * k)
        P_i = sum(float(probs[t, i]) for t in range(T)) / T
        want += E * f_i * P_i
    assert float(balance_loss(probs, experts)) == pytest.approx(want, rel=1e-6)
    uniform = torch.full((T, E), 1.0 / E)
    assert float(balance_loss(uniform, torch.arange(T * k).reshape(T, k) % E)) == pytest.approx(1.0)
    want_z = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits.tolist()) / T
    assert float(z_loss(logits)) == pytest.approx(want_z, rel=1e-6)


def test_the_bias_moves_towards_a_uniform_load_and_stats_are_logged():
    cfg = MoEConfig(num_experts=4, top_k=1, bias_update_rate=0.01)
    torch.manual_seed(0)
    layer = MoE(cfg, "geglu", 24, 40)
    with torch.no_grad():
        layer.expert_bias.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0]))  # every token to expert 0
    layer.train()
    x = torch.randn(64, 24)
    layer(x)
    total, logged = router_loss(layer, cfg)
    p0 = float(layer.route(x).probs[:, 0].mean().detach())  # f = (1, 0, 0, 0): the loss is E * P_0
    assert logged["moe_balance"] == pytest.approx(4 * p0, rel=1e-5)
    assert float(total.detach()) == pytest.approx(0.01 * logged["moe_balance"] + 0.001 * logged["moe_z"], rel=1e-5)
    stats = update_routers(layer, cfg)
    assert stats["moe_load"] == [[1.0, 0.0, 0.0, 0.0]] and stats["moe_load_max"] == 4.0
    assert 0 < stats["moe_entropy"] < math.log(4)
    torch.testing.assert_close(layer.expert_bias, torch.tensor([0.99, 0.01, 0.01, 0.01]))
    assert update_routers(layer, cfg) == {}  # nothing routed since


def _moe_cfg(**moe) -> ModelConfig:
    base = dict(num_experts=4, top_k=2, expert_width=48)
    return get_preset("griffin-tiny").replace(moe=MoEConfig(**(base | moe)))


@pytest.mark.parametrize("shared, structure", [(0, LinearStructure()), (1, LinearStructure("lowrank", rank=16))])
def test_accounting_matches_the_layer_equations(shared, structure):
    cfg = _moe_cfg(shared_experts=shared).replace(ffn_structure=structure)
    D, H, E, k, L = cfg.width, 48, 4, 2, cfg.num_layers

    def mlp(h, layer):  # GeGLU: gate and up (D -> h), down (h -> D), each with a bias
        s = LinearStructure() if layer == 0 else structure  # the first layer's FFN is kept dense
        w = 3 * D * h if s.kind == "dense" else 2 * s.rank * (D + h) + s.rank * (h + D)
        return w, 2 * h + D

    total_ffn = active_ffn_w = 0
    for layer in range(L):
        w, b = mlp(H, layer)
        sw, sb = mlp(H * shared, layer) if shared else (0, 0)
        total_ffn += D * E + E * (w + b) + sw + sb
        active_ffn_w += D * E + k * w + sw
    model = Griffon(cfg)
    ffn_built = sum(p.numel() for blk in model.blocks for p in blk.mlp.parameters())
    assert ffn_params(cfg) == total_ffn == ffn_built
    idle = sum((E - k) * sum(mlp(H, layer)) for layer in range(L))
    assert active_params(cfg) == model.num_params() - idle == param_counts(cfg)[0] - idle
    dense = cfg.replace(moe=MoEConfig())
    dense_ffn_w = sum(mlp(cfg.resolved_mlp_width, layer)[0] for layer in range(L))
    assert matmul_params(cfg) - matmul_params(dense) == active_ffn_w - dense_ffn_w
    flops = forward_flops_per_token(cfg, 64)
    assert flops["matmul"] == 2 * matmul_params(cfg)


def test_bad_moe_configs_get_one_line(capsys):
    for moe, message in (
        ({"num_experts": 4, "top_k": 5}, "moe.top_k must lie in [1, num_experts=4], got 5"),
        ({"num_experts": 0}, "moe.num_experts must be at least 1 (null for a dense FFN), got 0"),
        ({"num_experts": 4, "aux_loss_coef": -1}, "moe.aux_loss_coef must be >= 0"),
        ({"num_experts": 4, "expert_width": 8}, "ffn_structure.rank 16 exceeds an FFN projection 64 -> 8"),
        ({"num_experts": 4, "router": 1}, "unknown"),
    ):
        d = get_preset("griffin-tiny").to_dict() | {"moe": moe}
        d["ffn_structure"] = {"kind": "lowrank", "rank": 16}
        with pytest.raises(ConfigError, match=re.escape(message)):
            ModelConfig.from_dict(d)
    assert main(["info", "griffin-tiny", "--set", "moe.num_experts=2", "--set", "moe.top_k=3"]) == 2
    err = capsys.readouterr().err
    assert "moe.top_k must lie in [1, num_experts=2], got 3" in err and len(err.strip().splitlines()) == 1


def test_info_prints_active_parameters(capsys):
    assert main(["info", "griffin-tiny", "--set", "moe.num_experts=8", "--set", "moe.expert_width=96", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    cfg = get_preset("griffin-tiny").replace(moe=MoEConfig(num_experts=8, expert_width=96))
    assert info["active_params"] == active_params(cfg) < info["params"] == param_counts(cfg)[0]


def test_many_experts_are_counted_without_building_them_and_refused_for_training(tmp_path, capsys):
    """A mixture is counted exactly from two small builds (the linear extension equals the count
    of the model built whole), so ``info`` on 10,000 experts a layer is quick; training it is
    refused with the memory estimate before anything is written."""
    import time

    from griffon.accounting import build_bytes, module_count
    from griffon.train.trainer import train
    from test_train import tiny_config

    for moe in (MoEConfig(num_experts=7, top_k=2, shared_experts=1), MoEConfig(num_experts=9, top_k=1)):
        cfg = get_preset("griffin-tiny").replace(moe=moe)
        with torch.device("meta"):
            built = Griffon(cfg)
        assert param_counts(cfg) == (built.num_params(), built.num_params(non_embedding=True))
        assert abs(module_count(cfg) - sum(1 for _ in built.modules())) <= 0.1 * module_count(cfg)
    t0 = time.perf_counter()
    assert main(["info", "griffin-small", "--set", "moe.num_experts=10000", "--json"]) == 0
    assert time.perf_counter() - t0 < 60  # building it whole on the meta device took 3.5 minutes
    info = json.loads(capsys.readouterr().out)
    assert info["params"] > 3.5e10
    cfg = tiny_config("model.moe.num_experts=100000", "model.moe.expert_width=512")
    assert build_bytes(cfg.model, 16) > 2**38  # 459 GiB
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"^training this model needs about [\d.]+ GiB \([\d,]+ weights, 100000 "):
        train(cfg, run)
    assert not run.exists()


def test_decoding_a_moe_model_equals_its_forward():
    from griffon.decode.fused import FusedDecoder

    model = Griffon(_moe_cfg(shared_experts=1)).eval()
    tokens = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        full, _ = model(tokens)
        cache = model.init_cache(2)
        fused = FusedDecoder(model)
        cache_f = model.init_cache(2)
        for t in range(12):
            step, cache = model(tokens[:, t : t + 1], cache=cache)
            torch.testing.assert_close(step[:, 0], full[:, t], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(fused.step(tokens[:, t], cache_f), full[:, t], rtol=1e-4, atol=1e-4)


MOE_TRAIN = ["model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.expert_width=64",
             "model.moe.bias_update_rate=0.01"]  # fmt: skip


def test_training_a_moe_model_logs_the_load_and_resumes_bitwise(tmp_path):
    """Load and entropy in the log, the load plot, the routing bias saved with the weights, and a
    run resumed from its step-3 checkpoint repeating the same losses bit for bit."""
    import shutil

    from griffon import from_pretrained
    from griffon.train.logging import read_records
    from griffon.train.trainer import train
    from test_train import losses, tiny_config

    cfg = tiny_config("max_steps=6", "save_every=3", "keep_checkpoints=3", *MOE_TRAIN)
    train(cfg, tmp_path / "whole")
    records = [r for r in read_records(tmp_path / "whole" / "log.jsonl") if r["kind"] == "train"]
    assert all(len(r["moe_load"]) == 3 and len(r["moe_load"][0]) == 4 for r in records)
    assert all(sum(r["moe_load"][0]) == pytest.approx(1.0) and 0 < r["moe_entropy"] < math.log(4) for r in records)
    assert all(r["moe_balance"] >= 1.0 - 1e-6 and r["moe_z"] > 0 for r in records)
    assert (tmp_path / "whole" / "moe_load.png").stat().st_size > 0
    final = from_pretrained(tmp_path / "whole" / "checkpoints" / "step_000006")
    assert any(blk.mlp.expert_bias.abs().sum() > 0 for blk in final.blocks)  # the bias moved and was saved

    (tmp_path / "doc.txt").write_text("To be, or not to be, that is the question. " * 8)
    whole = str(tmp_path / "whole")
    assert main(["sample", whole, "--prompt", "KING", "--max-new-tokens", "5", "--step", "fused"]) == 0
    assert main(["eval", whole, "--text", str(tmp_path / "doc.txt"), "--seq-len", "32"]) == 0

    shutil.copytree(tmp_path / "whole", tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step_000006")
    train(cfg, tmp_path / "cut", resume=True)
    assert losses(tmp_path / "cut") == losses(tmp_path / "whole")
    resumed = from_pretrained(tmp_path / "cut" / "checkpoints" / "step_000006").state_dict()
    for key, value in final.state_dict().items():
        assert torch.equal(resumed[key], value), key


def test_moe_training_with_activation_checkpointing_is_exact(tmp_path):
    from griffon.train.trainer import train
    from test_train import losses, tiny_config

    train(tiny_config("max_steps=3", "save_every=3", *MOE_TRAIN), tmp_path / "plain")
    train(tiny_config("max_steps=3", "save_every=3", "activation_checkpointing=true", *MOE_TRAIN), tmp_path / "ckpt")
    assert losses(tmp_path / "ckpt") == losses(tmp_path / "plain")


def test_export_hf_refuses_a_moe_model(tmp_path, capsys):
    from griffon.checkpoint import save_pretrained

    save_pretrained(Griffon(_moe_cfg()), tmp_path / "ckpt")
    assert main(["export-hf", str(tmp_path / "ckpt"), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip()
    assert "a mixture-of-experts FFN" in err and "\n" not in err and not (tmp_path / "hf").exists()


def test_dispatch_under_bf16_autocast_matches_the_reference():
    layer = _layer(shared=1)
    x = torch.randn(40, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, want = layer(x), layer.forward_reference(x)
        chosen = layer.route(x).experts
    assert y.dtype == want.dtype == torch.float32
    assert torch.equal(chosen, layer.route(x).experts)  # the router runs in float32 under autocast too
    torch.testing.assert_close(y, want, rtol=2e-2, atol=2e-2)
