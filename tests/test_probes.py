"""The probes: generators checked by their solvers, the loss on the answer only, an honest
evaluation (global attention learns a small instance; a local-attention model that cannot see the
answer's source stays at chance), and bad input refused with one line."""

import json

import numpy as np
import pytest

from griffon.cli import main
from griffon.probes.run import examples, probe_data
from griffon.probes.tasks import TASKS, get_task


@pytest.mark.parametrize("name", list(TASKS))
def test_every_answer_follows_from_its_prompt(name):
    task = TASKS[name]
    rng = np.random.default_rng(0)
    for length in (task.min_length, task.min_length + 5, 3 * task.min_length + 7):
        for _ in range(50):
            ex = task.example(rng, length)
            assert task.solve(ex.prompt) == ex.answer
    copy = TASKS["selective-copy"].example(rng, 100)
    assert len(copy.prompt) == 101 and len(copy.answer) == 16
    book = TASKS["phonebook"].example(rng, 10)
    assert book.prompt.count("\n") == 12 and len(book.answer) == 7  # 10 entries, 2 worked lookups


@pytest.mark.parametrize("name", list(TASKS))
def test_the_loss_covers_exactly_the_answer(name):
    task = TASKS[name]
    rng = np.random.default_rng(3)
    want = [task.example(rng, task.min_length + 4) for _ in range(5)]
    for (ids, mask), ex in zip(examples(task, 5, task.min_length + 4, seed=3), want, strict=True):
        assert bytes(ids) == (ex.prompt + ex.answer).encode()
        assert bytes(t for t, m in zip(ids, mask, strict=True) if m) == ex.answer.encode()
        assert mask == sorted(mask)  # the answer is the end of the example
    data, seq_len = probe_data(task, task.min_length + 4, 20, 4, seed=0)
    assert data.train.targets.sum() == sum(len(ex.answer.encode()) for ex in (task.example(
        np.random.default_rng(0), task.min_length + 4) for _ in range(20)))  # fmt: skip


def _probe(tmp_path, name, *extra):
    argv = ["probe", "train", "induction", "--out", str(tmp_path / name), "--train-length", "24", "--lengths", "24",
            "--steps", "300", "--examples", "2000", "--eval-examples", "64", "--lr", "3e-3", *extra]  # fmt: skip
    assert main(argv) == 0
    assert (tmp_path / name / "accuracy.png").stat().st_size > 0
    return json.loads((tmp_path / name / "results.json").read_text())["models"]


def test_global_attention_learns_induction_and_a_blind_local_model_stays_at_chance(tmp_path, capsys):
    """Induction over 24 letters: the MQA transformer (global attention) learns it; a transformer
    of one layer with a window of 2 cannot see back to the trigger's letter, so whatever its
    training it stays near chance (1/16), which the evaluation must report."""
    seeing = _probe(tmp_path, "global", "--models", "mqa")["mqa"]
    blind = _probe(tmp_path, "blind", "--models", "mqa", "--set", "model.attention_window=2",
                   "--set", "model.num_layers=1", "--set", "model.max_seq_len=null")["mqa"]  # fmt: skip
    assert seeing["accuracy"]["24"] >= 0.9
    assert blind["accuracy"]["24"] <= 0.25


def test_bad_probe_requests_get_one_line(tmp_path, capsys):
    out = str(tmp_path / "p")
    for argv, message in (
        (["induction", "--models", "rwkv"], "unknown model family 'rwkv'"),
        (["induction", "--train-length", "2"], "length 2 is below the task's minimum 3"),
        (["selective-copy", "--lengths", "8"], "length 8 is below the task's minimum 16"),
        (["induction", "--models", "mqa", "--set", "model.max_seq_len=32"], "beyond model.max_seq_len=32"),
        (["induction", "--set", "model.vocab_size=64"], "model.vocab_size must be at least 256"),
    ):
        assert main(["probe", "train", *argv, "--out", out]) == 2, argv
        assert message in capsys.readouterr().err, argv
        assert not (tmp_path / "p").exists()
    with pytest.raises(ValueError, match="unknown probe task 'copy'"):
        get_task("copy")
