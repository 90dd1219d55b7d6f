"""Run directories under hostile files, concurrent trainers, interruptions, full disks and refusals."""

import errno
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from griffon.checkpoint import CheckpointError
from griffon.cli import main
from griffon.model import Griffon
from griffon.presets import get_preset
from griffon.run import Run, RunLockedError
from griffon.train import state as run_state
from griffon.train.logging import read_records
from griffon.train.state import Progress, check_weights, load_checkpoint, save_checkpoint
from griffon.train.trainer import TrainingError, train
from test_train import TINY, _fails, _run_cli, losses, tiny_config

SETS = [f"--set={s}" for s in TINY]


def _tiny_run(path: Path, *extra: str) -> Path:
    assert main(["train", "--out", str(path), *SETS, "--set=max_steps=2", "--set=save_every=2", *extra]) == 0
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return _tiny_run(tmp_path_factory.mktemp("run") / "run")


class _Payload:
    """A pickle that, when loaded, writes a file: proof that loading ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",)


def test_no_file_of_a_run_or_checkpoint_is_unpickled(run, tmp_path, capsys):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Payload(marker))
    pickle.loads(payload)  # the payload works when something unpickles it
    assert marker.exists()
    marker.unlink()
    files = sorted(p.relative_to(run) for p in run.rglob("*") if p.is_file() and p.name != ".lock")
    assert Path("checkpoints/step_000002/optimizer.safetensors") in files and Path("data/val.docs.npy") in files
    for rel in files:
        variants = {"pickle": lambda p: p.write_bytes(payload)}
        if rel.suffix == ".npy":  # a genuine .npy file holding a pickled object array
            variants["npy"] = lambda p: np.save(p, np.array([_Payload(marker)], dtype=object), allow_pickle=True)
        if rel.name == "optimizer.safetensors":  # an old-style optimizer.pt: torch.save's pickle
            variants["torch.save"] = lambda p: (
                p.unlink(),
                torch.save({"optimizer": _Payload(marker)}, p.with_suffix(".pt")),
            )
        for kind, plant in variants.items():
            victim = tmp_path / f"victim-{len(list(tmp_path.iterdir()))}"
            shutil.copytree(run, victim)
            plant(victim / rel)
            main(["train", "--resume", str(victim)])
            main(["sample", str(victim), "--max-new-tokens", "2", "--seed", "0"])
            main(["info", str(victim / "checkpoints" / "step_000002")])
            capsys.readouterr()
            assert not marker.exists(), f"loading {rel} ({kind}) ran code"
            shutil.rmtree(victim)


def test_legacy_optimizer_pt_still_resumes(run, tmp_path):
    victim = tmp_path / "legacy"
    shutil.copytree(run, victim)
    ckpt = victim / "checkpoints" / "step_000002"
    from griffon.tensor_tree import load_tree

    torch.save(load_tree(ckpt / "optimizer.safetensors"), ckpt / "optimizer.pt")
    (ckpt / "optimizer.safetensors").unlink()
    model = Griffon(get_preset("griffin-tiny"))
    state, progress = load_checkpoint(ckpt, model)
    assert progress.step == 2 and "state" in state["optimizer"]


def test_a_second_trainer_is_refused_and_a_killed_one_leaves_no_lock(run, tmp_path, capsys):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from griffon.run import Run; "
         "Run(sys.argv[1]).lock().acquire(); print('locked', flush=True); time.sleep(600)", str(run)],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == b"locked"
        _fails(["train", "--resume", str(run)], capsys, f"is being trained by another process (pid {holder.pid} on")
        with pytest.raises(RunLockedError):
            Run(run).lock().acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with Run(run).lock():  # the kernel released the killed holder's lock
        pass


def test_ctrl_c_saves_a_checkpoint_exits_in_one_line_and_resumes_exactly(tmp_path):
    args = [*SETS, "--set=max_steps=12", "--set=save_every=100"]
    whole = _run_cli(["train", "--out", str(tmp_path / "whole"), *args], tmp_path)
    assert whole.wait(timeout=300) == 0, whole.stderr.read().decode()
    cut = tmp_path / "cut"
    victim = _run_cli(["train", "--out", str(cut), *args], tmp_path)
    deadline = time.time() + 300
    while not (cut / "log.jsonl").exists() or len(read_records(cut / "log.jsonl")) < 3:
        assert victim.poll() is None and time.time() < deadline, "run ended before step 3"
        time.sleep(0.02)
    victim.send_signal(signal.SIGINT)
    assert victim.wait(timeout=120) == 130
    err = victim.stderr.read().decode().strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    assert err[-1].startswith("griffon train: interrupted at step ") and f"--resume {cut}" in err[-1]
    step = int(err[-1].split("interrupted at step ")[1].split(",")[0])
    assert 3 <= step < 12 and [p.name for p in (cut / "checkpoints").iterdir()] == [f"step_{step:06d}"]
    resumed = _run_cli(["train", "--resume", str(cut)], tmp_path)
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read().decode()
    assert losses(cut) == losses(tmp_path / "whole")


def test_refusals_write_nothing(tmp_path, capsys):
    run = tmp_path / "r"
    out = ["--out", str(run), *SETS]
    _fails(["train", *out, f"--set=data.path={tmp_path / 'nodata'}"], capsys, "nodata not found")
    _fails(["train", *out, "--set=optim.lr=NaN"], capsys, "lr must be a finite number, got nan")
    _fails(["train", *out, "--set=optim.beta2=Infinity"], capsys, "beta2 must be a finite number")
    _fails(
        ["train", *out, "--set=model.vocab_size=100"], capsys, "tokenizer has 256 tokens but model.vocab_size is 100"
    )
    (tmp_path / "list.json").write_text("[1, 2]")
    _fails(["train", str(tmp_path / "list.json"), *out], capsys, "list.json: a train config must be a JSON object")
    (tmp_path / "null.json").write_text("null")
    _fails(["train", str(tmp_path / "null.json"), *out], capsys, "must be a JSON object, got NoneType")
    assert not run.exists()
    (tmp_path / "file").write_text("")
    _fails(["train", "--out", str(tmp_path / "file" / "run"), *SETS], capsys, "Not a directory")


def test_kill_during_data_preparation_leaves_a_reusable_directory(tmp_path, capsys, monkeypatch):
    import griffon.data.prepare as prep

    real = prep._tokenize

    def killed(*args, **kwargs):
        real(*args, **kwargs)  # the shards are written...
        raise KeyboardInterrupt  # ...then Ctrl-C

    monkeypatch.setattr(prep, "_tokenize", killed)
    run = tmp_path / "r"
    assert main(["train", "--out", str(run), *SETS, "--set=max_steps=1"]) == 130
    assert capsys.readouterr().err.strip().endswith("griffon train: interrupted")
    assert sorted(p.name for p in run.iterdir()) == [".lock"]
    (run / ".tmp_data_x1b2").mkdir()  # what a kill -9 leaves behind
    (run / ".tmp_data_x1b2" / "train.bin").write_bytes(b"\0" * 10)
    monkeypatch.setattr(prep, "_tokenize", real)
    _tiny_run(run)
    assert not (run / ".tmp_data_x1b2").exists()


def test_kill_during_the_first_checkpoint_resumes_from_step_zero(tmp_path, capsys):
    fresh = _tiny_run(tmp_path / "fresh")
    run = _tiny_run(tmp_path / "r")
    shutil.rmtree(run / "checkpoints")
    (run / "checkpoints" / ".tmp_step_000002_abc").mkdir(parents=True)  # half-written when killed
    (run / "checkpoints" / ".trash_step_000001_def").mkdir()  # half-deleted
    assert main(["train", "--resume", str(run)]) == 0
    assert "has no checkpoint yet: starting it from step 0" in capsys.readouterr().err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000002"]
    assert losses(run) == losses(fresh)


def test_truncated_log_line_is_dropped_and_a_malformed_one_named(tmp_path, capsys):
    run = _tiny_run(tmp_path / "r")
    with open(run / "log.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 3, "lo')  # a disk filled up mid-write
    assert main(["train", "--resume", str(run), "--set=max_steps=3"]) == 0
    assert sorted(losses(run)) == [1, 2, 3]
    capsys.readouterr()
    lines = (run / "log.jsonl").read_text().splitlines()
    (run / "log.jsonl").write_text("\n".join([lines[0], "{oops", *lines[1:]]) + "\n")
    _fails(["train", "--resume", str(run), "--set=max_steps=4"], capsys, f"{run / 'log.jsonl'}:2: malformed log record")


def test_full_disk_during_logging_is_one_line(tmp_path, capsys, monkeypatch):
    capsys.readouterr()
    import griffon.train.logging as logging

    real_open = open

    def full_disk(path, mode="r", *args, **kwargs):
        if str(path).endswith("log.jsonl") and "a" in mode:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(logging, "open", full_disk, raising=False)
    _fails(["train", "--out", str(tmp_path / "r"), *SETS], capsys, "cannot write the log in")
    monkeypatch.undo()
    assert main(["train", "--resume", str(tmp_path / "r")]) == 0  # no checkpoint was saved: from step 0
    assert sorted(losses(tmp_path / "r")) == list(range(1, 51))


def test_full_disk_during_a_checkpoint_names_it(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(run_state, "save_tree", full)
    with pytest.raises(TrainingError, match="cannot write checkpoint .*step_000002: no space left on device; none was"):
        train(tiny_config("max_steps=2", "save_every=2"), tmp_path / "r")
    assert not (tmp_path / "r" / "checkpoints" / "step_000002").exists()
    assert not list((tmp_path / "r" / "checkpoints").iterdir())  # no temporary directory left


def test_exploded_or_non_finite_weights_are_never_saved(tmp_path):
    model = Griffon(get_preset("griffin-tiny"))
    progress = Progress(step=1)
    check_weights(model, 1e4)
    with torch.no_grad():
        model.blocks[1].mlp.up.weight[3, 2] = 2e4
    with pytest.raises(CheckpointError, match=r"'blocks.1.mlp.up.weight' has a weight of magnitude 2e\+04"):
        save_checkpoint(Run(tmp_path), model, {"optimizer": {}}, progress, keep=2, max_weight_abs=1e4)
    save_checkpoint(Run(tmp_path), model, {"optimizer": {}}, progress, keep=2, max_weight_abs=None)
    with torch.no_grad():
        model.embed.weight[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="'embed.weight' is not finite"):
        save_checkpoint(Run(tmp_path), model, {"optimizer": {}}, Progress(step=2), keep=2, max_weight_abs=None)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_000001"]
    # in a run: a limit the weights exceed at the first save stops it without a checkpoint
    with pytest.raises(TrainingError, match="stopping at step 2: .*the weights have exploded; none was saved before"):
        train(tiny_config("max_steps=4", "save_every=2", "max_weight_abs=0.01"), tmp_path / "r")
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_corrupt_newest_checkpoint_names_the_previous_one(tmp_path, capsys):
    run = _tiny_run(tmp_path / "r", "--set=max_steps=4")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000002", "step_000004"]
    state = run / "checkpoints" / "step_000004" / "state.json"
    progress = json.loads(state.read_text())
    del progress["loader"]
    state.write_text(json.dumps(progress))
    capsys.readouterr()
    _fails(["train", "--resume", str(run)], capsys, "lacks field(s) loader; checkpoint step_000002 loads: resume "
           f"from it with --resume {run} --checkpoint step_000002")  # fmt: skip
    _fails(["train", "--resume", str(run), "--checkpoint", "step_000003"], capsys, "has no checkpoint 'step_000003'")
    assert main(["train", "--resume", str(run), "--checkpoint", "step_000002", "--set=max_steps=3"]) == 0
    capsys.readouterr()
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["discarded_step_000004", "step_000002", "step_000003"]
    assert sorted(losses(run)) == [1, 2, 3]


def test_resume_accepts_safe_overrides_only(tmp_path, capsys):
    run = _tiny_run(tmp_path / "r")
    assert main(["train", "--resume", str(run), "--set=max_steps=3", "--set=optim.lr=1e-4"]) == 0
    saved = json.loads((run / "config.json").read_text())
    assert saved["max_steps"] == 3 and saved["optim"]["lr"] == 1e-4
    assert sorted(losses(run)) == [1, 2, 3]
    capsys.readouterr()
    _fails(
        ["train", "--resume", str(run), "--set=data.seq_len=64"],
        capsys,
        "--set data.seq_len cannot change when resuming",
    )


def test_files_get_the_umask_modes(tmp_path):
    old = os.umask(0o027)
    try:
        run = _tiny_run(tmp_path / "r")
    finally:
        os.umask(old)
    ckpt = run / "checkpoints" / "step_000002"
    for p in [run / "config.json", run / "tokenizer.json", run / "data" / "train.bin", *ckpt.iterdir()]:
        assert p.stat().st_mode & 0o777 == 0o640, p
    for p in [run / "data", ckpt]:
        assert p.stat().st_mode & 0o777 == 0o750, p


def test_corrupted_data_is_caught_when_a_run_starts(tmp_path, capsys):
    from griffon.data.prepare import prepare
    from griffon.data.tokenizers import ByteTokenizer

    (tmp_path / "a.txt").write_text("some text to train on " * 200)
    (tmp_path / "b.txt").write_text("held out text " * 100)
    prepare([tmp_path / "a.txt", tmp_path / "b.txt"], ByteTokenizer(), tmp_path / "data", 0.5, progress=False)
    assert main(["data", "verify", str(tmp_path / "data")]) == 0
    capsys.readouterr()
    shard = tmp_path / "data" / "train.bin"
    data = bytearray(shard.read_bytes())
    data[100] ^= 1  # one flipped bit
    shard.write_bytes(bytes(data))
    _fails(["data", "verify", str(tmp_path / "data")], capsys, "train.bin does not match meta.json")
    args = ["train", "--out", str(tmp_path / "r"), *SETS, f"--set=data.path={tmp_path / 'data'}"]
    _fails(args, capsys, "train.bin does not match meta.json")
    assert not (tmp_path / "r").exists()
    assert main([*args, "--set=data.verify=false", "--set=max_steps=1"]) == 0


def test_only_checkpoints_griffon_wrote_count(tmp_path, capsys):
    """A user's copies beside the checkpoints (``step_000010_keep_this``, ``step_zz_manual_backup``,
    a link named like one) are never taken as checkpoints, resumed, scored or deleted."""
    from griffon.checkpoint import resolve

    run = _tiny_run(tmp_path / "r", "--set=max_steps=4")
    ckpts = run / "checkpoints"
    shutil.copytree(ckpts / "step_000002", ckpts / "step_000010_keep_this")
    shutil.copytree(ckpts / "step_000002", ckpts / "step_zz_manual_backup")
    (ckpts / "step_000099").symlink_to(ckpts / "step_000002", target_is_directory=True)
    assert [p.name for p in Run(run).checkpoints()] == ["step_000002", "step_000004"]
    assert resolve(run)[0].name == "step_000004"  # what eval, sample and serve take
    assert main(["train", "--resume", str(run), "--set=max_steps=6"]) == 0  # keeps two: step_000002 goes
    capsys.readouterr()
    names = sorted(p.name for p in ckpts.iterdir())
    assert names == ["step_000004", "step_000006", "step_000010_keep_this", "step_000099", "step_zz_manual_backup"]
    assert sorted(losses(run)) == [1, 2, 3, 4, 5, 6]


def test_a_checkpoints_folder_that_is_a_link_is_refused(tmp_path, capsys):
    run = _tiny_run(tmp_path / "r")
    elsewhere = tmp_path / "elsewhere"
    (run / "checkpoints").rename(elsewhere)
    (elsewhere / "precious.txt").write_text("keep me")
    (run / "checkpoints").symlink_to(elsewhere, target_is_directory=True)
    before = sorted(p.name for p in elsewhere.iterdir())
    capsys.readouterr()
    _fails(["train", "--resume", str(run), "--set=max_steps=4"], capsys, "checkpoints is a symbolic link")
    _fails(["eval", str(run), "--text", str(run / "config.json")], capsys, "checkpoints is a symbolic link")
    assert sorted(p.name for p in elsewhere.iterdir()) == before


def test_resume_checks_an_edited_config_before_building_the_model(tmp_path, capsys, monkeypatch):
    """A run's config.json edited to a width of 100,000 (a 40 GB model) is refused by name before
    any model is built, against the checkpoint's own config and tensor headers."""
    import griffon.train.trainer as trainer

    run = _tiny_run(tmp_path / "r")
    saved = json.loads((run / "config.json").read_text())
    saved["model"]["width"] = 100_000
    (run / "config.json").write_text(json.dumps(saved))
    built = []
    monkeypatch.setattr(trainer, "Griffon", lambda cfg: built.append(cfg) or pytest.fail("a model was built"))
    capsys.readouterr()
    _fails(["train", "--resume", str(run)], capsys, "was made with model.width=")
    assert not built
