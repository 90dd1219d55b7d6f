"""The trainer: schedules, losses, resume, NaN guard, bad input, distributed equivalence."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from griffon.cli import main
from griffon.config import ConfigError
from griffon.decode import compiled
from griffon.model import Griffon
from griffon.presets import get_preset
from griffon.train.config import OptimConfig, TrainConfig, apply_overrides
from griffon.train.losses import goldfish_mask, next_token_loss
from griffon.train.optim import adaptive_grad_clip, lr_at, param_groups
from griffon.train.trainer import TrainingError, train

# A run small enough for seconds on CPU: tiny Griffin, 32-token sequences, exact (fp32, no time limit).
TINY = [
    "model=griffin-tiny", "data.seq_len=32", "data.batch_size=4", "dtype=fp32", "max_minutes=null", "max_steps=50",
    "eval_batches=2", "final_eval_batches=3", "eval_every=4", "log_every=1", "optim.warmup_steps=2",
]  # fmt: skip


def tiny_config(*extra: str) -> TrainConfig:
    return TrainConfig.from_dict(apply_overrides(TrainConfig().to_dict(), TINY + list(extra)))


def losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def test_lr_schedules():
    cfg = OptimConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=10, schedule="cosine")
    assert lr_at(0, 100, cfg) == pytest.approx(0.1)
    assert lr_at(9, 100, cfg) == pytest.approx(1.0)
    assert lr_at(55, 100, cfg) == pytest.approx(0.55)  # halfway through the cosine
    assert lr_at(100, 100, cfg) == pytest.approx(0.1)
    wsd = OptimConfig(lr=1.0, min_lr_ratio=0.0, warmup_steps=10, schedule="wsd", decay_fraction=0.2)
    assert lr_at(50, 100, wsd) == 1.0 and lr_at(80, 100, wsd) == 1.0
    assert lr_at(90, 100, wsd) == pytest.approx(0.5) and lr_at(100, 100, wsd) == pytest.approx(0.0)
    assert lr_at(70, 100, OptimConfig(lr=2.0, warmup_steps=0, schedule="constant")) == 2.0


def test_no_weight_decay_on_norms_biases_embeddings_and_a_param():
    model = Griffon(get_preset("griffin-tiny"))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert "embed.weight" in no_decay_names and "final_norm.scale" in no_decay_names
    assert "blocks.0.temporal.rglru.a_param" in no_decay_names and "blocks.0.mlp.up.bias" in no_decay_names
    assert all(names[id(p)].endswith("weight") for p in decay["params"])
    assert "blocks.0.mlp.up.weight" in {names[id(p)] for p in decay["params"]}


def test_adaptive_grad_clip_bounds_each_row():
    lin = torch.nn.Linear(4, 3)
    with torch.no_grad():
        lin.weight.fill_(1.0)  # row norms 2
    lin.weight.grad = torch.tensor([[10.0, 0, 0, 0], [0.01, 0, 0, 0], [0, 0, 3.0, 4.0]])
    adaptive_grad_clip(lin, clip=0.5)  # max row grad norm 0.5 * 2 = 1
    norms = lin.weight.grad.norm(dim=1)
    assert norms[0] == pytest.approx(1.0) and norms[1] == pytest.approx(0.01) and norms[2] == pytest.approx(1.0)


def test_goldfish_mask_is_a_deterministic_function_of_context():
    g = torch.Generator().manual_seed(0)
    passage = torch.randint(0, 256, (1, 400), generator=g)
    other = torch.randint(0, 256, (1, 400), generator=g)
    shifted = torch.cat([torch.randint(0, 256, (1, 37), generator=g), passage[:, :-37]], 1)
    batch = torch.cat([passage, other, passage, shifted])
    mask = goldfish_mask(batch, k=4, h=13)
    assert torch.equal(mask[0], mask[2])  # the same passage drops the same tokens
    assert torch.equal(mask[3, 37 + 12 :], mask[0, 12:-37])  # wherever it appears in the sequence
    assert not torch.equal(mask[0], mask[1])  # other text drops other tokens
    assert mask[:, :12].all()  # too little context: kept
    dropped = 1 - mask[:, 12:].float().mean()
    assert 0.18 < dropped < 0.32  # about 1/k


def test_next_token_loss_averages_the_kept_targets_only():
    logits = torch.randn(3, 40, 256)
    targets = torch.randint(0, 256, (3, 40))
    mask = torch.rand(3, 40) < 0.6
    per_token = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    loss, n = next_token_loss(logits, targets, mask)
    assert n == mask.sum()
    torch.testing.assert_close(loss, per_token[mask.flatten()].mean())
    torch.testing.assert_close(next_token_loss(logits, targets)[0], per_token.mean())


def test_goldfish_training_leaves_dropped_targets_out_of_the_gradient(tmp_path, monkeypatch):
    """With every target dropped but one per row, the step's loss is that of the kept targets."""
    import griffon.train.objective as objective

    kept = []

    def one_per_row(inputs, k, h):
        mask = torch.zeros_like(inputs, dtype=torch.bool)
        mask[:, 5] = True
        return mask

    real_loss = objective.next_token_loss

    def spy(logits, targets, mask=None):
        loss, n = real_loss(logits, targets, mask)
        kept.append((loss.item(), real_loss(logits[:, 5:6], targets[:, 5:6])[0].item(), int(n)))
        return loss, n

    monkeypatch.setattr(objective, "goldfish_mask", one_per_row)
    monkeypatch.setattr(objective, "next_token_loss", spy)
    train(tiny_config("max_steps=2", "save_every=2", "goldfish_k=4"), tmp_path / "r")
    assert len(kept) == 2 and all(n == 4 and loss == pytest.approx(want, rel=1e-6) for loss, want, n in kept)


def test_training_writes_a_self_contained_run(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    argv = ["train", "--out", str(run), *[f"--set={s}" for s in TINY], "--set=max_steps=6", "--set=save_every=2"]
    assert main(argv) == 0
    for name in ("config.json", "tokenizer.json", "log.jsonl", "log.csv", "loss.png", "data/meta.json"):
        assert (run / name).is_file(), name
    # saved at 2, 4 and 6; only the newest keep_checkpoints=2 remain
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == ["step_000004", "step_000006"]
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    assert evals and all(math.isfinite(r["val_bpb"]) for r in evals)
    assert losses(run)[6] < losses(run)[1]
    assert main(["sample", str(run), "--prompt", "KING", "--max-new-tokens", "5", "--seed", "0"]) == 0
    capsys.readouterr()
    argv = ["sample", str(run), "--prompt", "KING", "--max-new-tokens", "60", "--seed", "0", "--temperature", "0"]
    assert main(argv) == 0
    free = capsys.readouterr().out[len("KING") : -1]
    if shutil.which("g++"):  # the compiled decode step (torch.compile needs a C++ compiler); no autotuning
        monkeypatch.setattr(compiled, "COMPILE_OPTIONS", {})
        assert main(argv + ["--step", "compiled"]) == 0
        assert capsys.readouterr().out == "KING" + free + "\n"
    stop = free[3:5]  # a piece of the greedy continuation
    assert main(argv + ["--stop", stop, "--stop", "never-seen"]) == 0
    assert capsys.readouterr().out == "KING" + free[: free.find(stop)] + "\n"


def test_budgets_tokens_and_flops(tmp_path):
    r = train(tiny_config("max_tokens=500"), tmp_path / "a")
    assert r.steps == 4  # ceil(500 / 128)
    from griffon.accounting import train_flops_per_token

    per_step = 128 * train_flops_per_token(get_preset("griffin-tiny"), 32)
    r = train(tiny_config(f"max_flops={per_step * 3}"), tmp_path / "b")
    assert r.steps == 3


def _run_cli(args, cwd):
    return subprocess.Popen([sys.executable, "-m", "griffon.cli", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=dict(os.environ, OMP_NUM_THREADS="1"))  # fmt: skip


def test_killed_and_resumed_run_repeats_the_same_losses(tmp_path):
    args = [*[f"--set={s}" for s in TINY], "--set=max_steps=14", "--set=save_every=4"]
    whole = _run_cli(["train", "--out", str(tmp_path / "whole"), *args], tmp_path)
    assert whole.wait(timeout=300) == 0, whole.stderr.read().decode()

    victim = _run_cli(["train", "--out", str(tmp_path / "cut"), *args], tmp_path)
    deadline = time.time() + 300
    while not (tmp_path / "cut" / "checkpoints" / "step_000008").exists():
        assert victim.poll() is None and time.time() < deadline, "run ended before its second checkpoint"
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    resumed = _run_cli(["train", "--resume", str(tmp_path / "cut")], tmp_path)
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read().decode()
    want, got = losses(tmp_path / "whole"), losses(tmp_path / "cut")
    assert sorted(got) == list(range(1, 15))
    assert got == want  # bitwise: same floats


def test_non_finite_steps_are_skipped_then_stop(tmp_path, monkeypatch):
    import griffon.train.objective as objective

    def poisoned(logits, targets, mask=None):
        return torch.tensor(float("nan"), requires_grad=True) * logits.sum(), torch.tensor(1)

    monkeypatch.setattr(objective, "next_token_loss", poisoned)
    with pytest.raises(TrainingError, match="3 steps in a row.*; no checkpoint was saved yet"):
        train(tiny_config("max_steps=10", "max_bad_steps=3", "save_every=1"), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()
    skips = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in skips] == ["skip"] * 3
    calls = []
    real = next_token_loss

    def poisoned_later(logits, targets, mask=None):
        calls.append(1)
        return real(logits, targets, mask) if len(calls) <= 2 else poisoned(logits, targets, mask)

    monkeypatch.setattr(objective, "next_token_loss", poisoned_later)
    with pytest.raises(TrainingError, match=r"the newest checkpoint \(step 2\) is from before them"):
        train(tiny_config("max_steps=10", "max_bad_steps=3", "save_every=1"), tmp_path / "later")


def _fails(argv, capsys, message):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err, err


def test_bad_inputs(tmp_path, capsys):
    out = ["--out", str(tmp_path / "r")]
    _fails(
        ["train", *out, "--set", "max_step=3"],
        capsys,
        "unknown train config key 'max_step' (did you mean 'max_steps'?)",
    )
    _fails(["train", *out, "--set", "optim.lr=fast"], capsys, "lr must be of type float")
    _fails(["train", *out, "--set", "model.widht=3"], capsys, "did you mean 'width'")
    _fails(["train", *out, "--set", "data.seq_len=-1"], capsys, "data.seq_len must be positive")
    _fails(["train", *out, "--set", "nosuch.key=1"], capsys, "'nosuch' is not a config section")
    _fails(["train", str(tmp_path / "none.json"), *out], capsys, "config file not found")
    _fails(["train", *out, *[f"--set={s}" for s in TINY], "--set=max_steps=2", f"--set=data.path={tmp_path / 'nodata'}"], capsys,
           "nodata not found")  # fmt: skip
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_too_little_data(tmp_path, capsys):
    from griffon.data.prepare import prepare
    from griffon.data.tokenizers import ByteTokenizer

    for name in ("a", "b"):
        (tmp_path / f"{name}.txt").write_text("short text " * 5)
    prepare([tmp_path / "a.txt", tmp_path / "b.txt"], ByteTokenizer(), tmp_path / "data", 0.5, progress=False)
    _fails(["train", "--out", str(tmp_path / "r"), *[f"--set={s}" for s in TINY], f"--set=data.path={tmp_path / 'data'}"],
           capsys, "cannot fill one step")  # fmt: skip


def test_vocabulary_mismatch(tmp_path, capsys):
    from griffon.data.prepare import prepare
    from griffon.data.tokenizers import train_bpe

    texts = [f"text number {i} " * 30 for i in range(20)]
    (tmp_path / "t.txt").write_text(texts[0])
    tok = train_bpe(iter(texts), 300, tmp_path / "tok.json")
    prepare([tmp_path / "t.txt"] * 4, tok, tmp_path / "data", val_fraction=0.25, progress=False)
    _fails(["train", "--out", str(tmp_path / "r"), *[f"--set={s}" for s in TINY], "--set", f"data.path={tmp_path / 'data'}"],
           capsys, "tokens but model.vocab_size is 256; set model.vocab_size=")  # fmt: skip


def test_existing_run_is_not_overwritten_and_resume_checks(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), *[f"--set={s}" for s in TINY], "--set=max_steps=2"]) == 0
    capsys.readouterr()  # the run's own log lines
    before = (run / "log.jsonl").read_text()
    _fails(["train", "--out", str(run), *[f"--set={s}" for s in TINY]], capsys, "already holds a run")
    assert (run / "log.jsonl").read_text() == before
    _fails(["train", "--resume", str(tmp_path / "empty")], capsys, "config file not found")
    # a checkpoint from another model config
    cfg = json.loads((run / "config.json").read_text())
    cfg["model"]["mlp_width"] = 128
    (run / "config.json").write_text(json.dumps(cfg))
    _fails(
        ["train", "--resume", str(run)], capsys, "was made with model.mlp_width=192, this run's config.json says 128"
    )
    cfg["model"]["mlp_width"] = 192
    (run / "config.json").write_text(json.dumps(cfg))
    ckpt = run / "checkpoints" / "step_000002" / "model.safetensors"
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    _fails(["train", "--resume", str(run)], capsys, "corrupted or truncated")


# A mixture of experts whose routing biases follow the load summed over ranks; its balance loss,
# a product of per-batch means, is off: each rank's would differ from the whole batch's.
MOE = ["model.moe.num_experts=4", "model.moe.expert_width=64", "model.moe.aux_loss_coef=0",
       "model.moe.bias_update_rate=0.01"]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("mode, extra", [("ddp", []), ("fsdp", []), ("ddp", MOE), ("fsdp", MOE)],
                         ids=["ddp", "fsdp", "ddp-moe", "fsdp-moe"])  # fmt: skip
def test_distributed_matches_single_process_and_resumes(tmp_path, mode, extra):
    common = [*[f"--set={s}" for s in TINY + extra], "--set=max_steps=4", "--set=save_every=2", "--set=eval_every=4"]
    single = _run_cli(["train", "--out", str(tmp_path / "single"), *common], tmp_path)
    assert single.wait(timeout=300) == 0, single.stderr.read().decode()
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "griffon.cli",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # two steps, then a resumed second process group for the other two
    first = [*torchrun, "train", "--out", str(tmp_path / mode), *common, "--set=data.batch_size=2",
             f"--set=distributed={mode}", "--set=max_steps=2"]  # fmt: skip
    proc = subprocess.run(first, cwd=tmp_path, capture_output=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    resumed = [*torchrun, "train", "--resume", str(tmp_path / mode), "--set=max_steps=4"]
    proc = subprocess.run(resumed, cwd=tmp_path, capture_output=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    want, got = losses(tmp_path / "single"), losses(tmp_path / mode)
    assert sorted(got) == sorted(want) == [1, 2, 3, 4]
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-4, abs=1e-5), step
    # the checkpoints written by rank 0 hold the full, unsharded model: the single process's weights
    from griffon import from_pretrained

    for name in ("step_000002", "step_000004"):
        ours = from_pretrained(tmp_path / mode / "checkpoints" / name).state_dict()
        ref = from_pretrained(tmp_path / "single" / "checkpoints" / name).state_dict()
        assert ours.keys() == ref.keys()
        for key in ref:
            torch.testing.assert_close(ours[key], ref[key], rtol=1e-4, atol=1e-5, msg=f"{name} {key}")


def test_gradient_accumulation_and_activation_checkpointing_match_the_plain_step(tmp_path):
    plain = train(tiny_config("max_steps=3", "save_every=3"), tmp_path / "plain")
    accum = train(
        tiny_config("max_steps=3", "save_every=3", "data.batch_size=2", "data.grad_accum=2"), tmp_path / "accum"
    )
    ckpt = train(tiny_config("max_steps=3", "save_every=3", "activation_checkpointing=true"), tmp_path / "ckpt")
    want = losses(tmp_path / "plain")
    assert plain.steps == accum.steps == ckpt.steps == 3
    for step, loss in losses(tmp_path / "accum").items():
        assert loss == pytest.approx(want[step], rel=1e-5)
    assert losses(tmp_path / "ckpt") == want  # recomputation is exact


def test_bf16_autocast_trains_close_to_float32(tmp_path):
    fp32 = train(tiny_config("max_steps=3", "save_every=3"), tmp_path / "fp32")
    bf16 = train(tiny_config("max_steps=3", "save_every=3", "dtype=bf16"), tmp_path / "bf16")
    want, got = losses(tmp_path / "fp32"), losses(tmp_path / "bf16")
    assert got != want  # bf16 matmuls ran
    assert all(got[s] == pytest.approx(want[s], rel=2e-2) for s in want)
    assert bf16.val_loss == pytest.approx(fp32.val_loss, rel=2e-2)


def test_wsd_and_goldfish_options_run(tmp_path):
    result = train(
        tiny_config("max_steps=3", "save_every=3", "optim.schedule=wsd", "goldfish_k=4", "optim.agc=0.05"),
        tmp_path / "r",
    )
    assert result.steps == 3 and math.isfinite(result.val_loss)


def test_a_new_objective_is_a_registry_entry(tmp_path, monkeypatch):
    """The loop reaches an objective and its data through the registry only: one entry trains a
    run with an objective of its own, its data opened, its statistics logged, its evaluation kept."""
    from griffon.train.objective import OBJECTIVES, NextToken, ObjectiveSpec

    built = []

    class Scaled(NextToken):
        def loss(self, model, batch):
            loss, _ = super().loss(model, batch)
            return 2 * loss, {"scale": 2.0}

        def evaluate(self, model, batches, device, autocast, reduce):
            return {"val_loss": -1.0, "val_scaled_batches": float(len(list(batches)))}

    def build(cfg, data, start):
        built.append((start.run.root, start.is_main, data))
        return Scaled(torch.ones(256))

    lm = OBJECTIVES["lm"]
    monkeypatch.setitem(OBJECTIVES, "scaled", ObjectiveSpec(lm.open_data, build))
    train(tiny_config("objective=scaled", "max_steps=2", "save_every=2", "final_eval_batches=3"), tmp_path / "r")
    [(root, is_main, data)] = built
    assert root == tmp_path / "r" and is_main and data.tokenizer.vocab_size <= 256
    records = [json.loads(line) for line in (tmp_path / "r" / "log.jsonl").read_text().splitlines()]
    assert [r["scale"] for r in records if r["kind"] == "train"] == [2.0, 2.0]
    [final] = [r for r in records if r["kind"] == "final_eval"]
    assert final["val_loss"] == -1.0 and final["val_scaled_batches"] == 3.0
    with pytest.raises(ConfigError, match="objective .nope. is not one of"):
        tiny_config("objective=nope")
