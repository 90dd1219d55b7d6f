"""Self-guided training: schedule, guide initialisation, removal, resume, fixed-FLOP budget."""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from griffon.checkpoint import from_pretrained
from griffon.config import ConfigError, LinearStructure
from griffon.model import Griffon
from griffon.nn.structured import StructuredLinear
from griffon.presets import get_preset
from griffon.tensor_tree import load_tree
from griffon.train.config import TrainConfig, apply_overrides
from griffon.train.optim import make_optimizer
from griffon.train.self_guided import SelfGuidance, dense_branch_runs, guide_coefficient, plan_guided_run
from griffon.train.trainer import train

TINY = [
    "model=griffin-tiny", "data.seq_len=32", "data.batch_size=4", "dtype=fp32", "max_minutes=null",
    "eval_batches=1", "final_eval_batches=1", "eval_every=100", "log_every=1", "optim.warmup_steps=2",
    "max_steps=10",
]  # fmt: skip
BLOCKSHUFFLE = ["model.ffn_structure.kind=blockshuffle", "model.ffn_structure.blocks=4"]
LOWRANK = ["model.ffn_structure.kind=lowrank", "model.ffn_structure.rank=16"]


def config(*extra: str) -> TrainConfig:
    return TrainConfig.from_dict(apply_overrides(TrainConfig().to_dict(), TINY + list(extra)))


def records(run, kind="train"):
    return [r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if r["kind"] == kind]


def test_coefficient_schedule():
    assert [guide_coefficient(t, 4) for t in range(6)] == pytest.approx(
        [1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4)), 0.0, 0.0]
    )


def test_guide_starts_as_the_dense_equivalent_permutations_included():
    torch.manual_seed(0)
    model = Griffon(get_preset("griffin-tiny", ffn_structure=LinearStructure(kind="blockshuffle", blocks=4)))
    tokens = torch.randint(0, 256, (2, 30))
    plain, _ = model(tokens)
    guidance = SelfGuidance(model)
    for a in (1.0, 0.3):
        guidance.coefficient = a
        torch.testing.assert_close(model(tokens)[0], plain, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        guidance.guides[0].zero_()  # now the mix is visible: a * guide(x) + (1 - a) * S(x)
    layer = model.get_submodule(guidance.names[0])
    x = torch.randn(5, layer.in_features)
    guidance.coefficient = 0.25
    torch.testing.assert_close(layer(x), 0.75 * layer.forward_structured(x) + layer.bias)
    guidance.active = False  # reduce_flop skipped the dense branch this step
    torch.testing.assert_close(layer(x), layer.forward_structured(x) + layer.bias)


@pytest.mark.parametrize("keep_first_dense", [True, False])
def test_guide_flops_are_six_per_guide_weight(keep_first_dense):
    from griffon.accounting import self_guided_flops_per_token

    structure = LinearStructure(kind="lowrank", rank=16, keep_first_dense=keep_first_dense)
    cfg = get_preset("griffin-tiny", ffn_structure=structure)
    guidance = SelfGuidance(Griffon(cfg))
    assert self_guided_flops_per_token(cfg) == 6 * sum(g.numel() for g in guidance.parameters())


def test_remove_leaves_no_guide_in_model_or_optimizer():
    model = Griffon(get_preset("hawk-tiny", ffn_structure=LinearStructure(kind="lowrank", rank=16)))
    opt = make_optimizer(model, config().optim)
    before = [list(g["params"]) for g in opt.param_groups]
    guidance = SelfGuidance(model)
    guidance.add_to(opt, 0.1)
    model(torch.randint(0, 256, (1, 8)))[0].sum().backward()
    for g in guidance.guides:
        assert g.grad is not None
    opt.step()
    guidance.remove(opt)
    assert [list(g["params"]) for g in opt.param_groups] == before
    assert len(opt.state) == sum(len(g) for g in before)
    assert not any(m._forward_hooks for m in model.modules() if isinstance(m, StructuredLinear))
    assert not any("guide" in name for name in model.state_dict())


def test_guided_run_logs_the_schedule_drops_the_guide_and_resumes_exactly(tmp_path):
    cfg = config(*BLOCKSHUFFLE, "self_guided.enabled=true", "self_guided.fraction=0.75", "max_steps=8",
                 "save_every=2", "keep_checkpoints=10")  # fmt: skip
    whole = tmp_path / "whole"
    train(cfg, whole)
    logged = {r["step"]: r["guide"] for r in records(whole)}
    # step s is logged after optimizer step s - 1, which used coefficient guide_coefficient(s - 1, 6)
    assert logged == pytest.approx({s: guide_coefficient(s - 1, 6) if s < 6 else 0.0 for s in range(1, 9)})
    ckpts = whole / "checkpoints"
    guided = load_tree(ckpts / "step_000004" / "optimizer.safetensors")
    assert set(guided) == {"optimizer", "self_guided"} and len(guided["optimizer"]["param_groups"]) == 3
    done = load_tree(ckpts / "step_000008" / "optimizer.safetensors")
    assert "self_guided" not in done and len(done["optimizer"]["param_groups"]) == 2
    model = from_pretrained(ckpts / "step_000008")  # a plain structured model
    assert not any("guide" in n for n in model.state_dict())

    cut = tmp_path / "cut"
    shutil.copytree(whole, cut)
    for step in (6, 8):
        shutil.rmtree(cut / "checkpoints" / f"step_{step:06d}")
    train(cfg, cut, resume=True)  # from step 4, inside the guided phase
    assert {r["step"]: r["loss"] for r in records(cut)} == {r["step"]: r["loss"] for r in records(whole)}


@pytest.mark.parametrize("reduce_flop", [False, True])
def test_fixed_flop_run_spends_the_dense_runs_flops(tmp_path, reduce_flop):
    # Runs stop at whole steps: 60 dense steps make one structured step well under 1% of the budget.
    dense = train(config("max_steps=60"), tmp_path / "dense")
    guided = train(
        config(*LOWRANK, "max_steps=60", "self_guided.enabled=true", "self_guided.mode=fixed_flops",
               "self_guided.fraction=0.5", f"self_guided.reduce_flop={str(reduce_flop).lower()}"),
        tmp_path / "guided",
    )  # fmt: skip
    assert abs(guided.flops - dense.flops) / dense.flops < 0.01
    assert guided.steps > dense.steps  # the structured model's cheaper steps buy more of them
    coefficients = [r["guide"] for r in records(tmp_path / "guided")]
    assert coefficients[0] == 1.0 and coefficients[-1] == 0.0


def test_plan_guided_run():
    assert plan_guided_run(0.5, "fixed_steps", False, 0, 10, 1.0, 1.0, 2.0, None) == (10, 5)
    # dense budget 10 steps x 2 = 20; 5 guided steps cost 5 x (1 + 1) = 10; 10 more plain steps
    assert plan_guided_run(0.5, "fixed_flops", False, 0, 10, 1.0, 1.0, 2.0, None) == (15, 5)
    total, guided = plan_guided_run(0.5, "fixed_flops", True, 0, 10, 1.0, 1.0, 2.0, None)
    ran = sum(dense_branch_runs(t, 5, True, 0) for t in range(5))
    assert guided == 5 and 1 <= ran < 5  # step 0 (a = 1) always runs the guide; later ones by chance
    assert total == 5 + (20 - 5 - ran)  # skipped dense branches leave FLOPs for more steps


def test_bad_self_guided_configs():
    with pytest.raises(ConfigError, match="needs a structured FFN"):
        config("self_guided.enabled=true")
    with pytest.raises(ConfigError, match="fraction must lie"):
        config(*LOWRANK, "self_guided.enabled=true", "self_guided.fraction=0")
    with pytest.raises(ConfigError, match="mode"):
        config(*LOWRANK, "self_guided.enabled=true", "self_guided.mode=fixed")
    with pytest.raises(ConfigError, match="not fsdp"):
        config(*LOWRANK, "self_guided.enabled=true", "distributed=fsdp")


@pytest.mark.slow
def test_ddp_guided_run_matches_single_process(tmp_path):
    common = [*TINY, *BLOCKSHUFFLE, "max_steps=6", "save_every=6", "self_guided.enabled=true",
              "self_guided.fraction=0.5", "self_guided.reduce_flop=true"]  # fmt: skip
    train(config(*common), tmp_path / "single")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "griffon.cli",
           "train", "--out", str(tmp_path / "ddp"), *[f"--set={s}" for s in common], "--set=data.batch_size=2",
           "--set=distributed=ddp"]  # fmt: skip
    proc = subprocess.run(
        cmd, cwd=tmp_path, capture_output=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600
    )
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    want = {r["step"]: r["loss"] for r in records(tmp_path / "single")}
    got = {r["step"]: r["loss"] for r in records(tmp_path / "ddp")}
    assert sorted(got) == sorted(want) == list(range(1, 7))
    for step in want:  # the guides' gradients are averaged across ranks like the model's
        assert got[step] == pytest.approx(want[step], rel=1e-4, abs=1e-5), step


def test_fixed_flop_extra_steps_can_reread_the_guided_batches(tmp_path, monkeypatch):
    """With ``extra_steps_data=reread`` the steps beyond the dense run's read the data again from
    its start, once, at the step the plan names; the default reads on."""
    from griffon.data.loader import PackedLoader

    resets = []
    load = PackedLoader.load_state_dict

    def record(self, state):
        resets.append((self.epoch, self.step, dict(state)))
        load(self, state)

    monkeypatch.setattr(PackedLoader, "load_state_dict", record)
    common = (*LOWRANK, "max_steps=20", "self_guided.enabled=true", "self_guided.mode=fixed_flops")
    train(config(*common), tmp_path / "continue")
    assert resets == []
    result = train(config(*common, "self_guided.extra_steps_data=reread"), tmp_path / "reread")
    assert result.steps > 20
    ((epoch, step, state),) = resets
    assert (epoch, step) == (0, 20) and state["step"] == 0  # after the dense run's 20 steps, from the start
    with pytest.raises(ConfigError, match="needs self_guided.mode=fixed_flops"):
        config(*LOWRANK, "max_steps=20", "self_guided.enabled=true", "self_guided.extra_steps_data=reread")
