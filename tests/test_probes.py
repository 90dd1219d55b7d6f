"""The probes: generators checked by their solvers, the loss on the answer only, an honest
evaluation (global attention learns a small instance; a local-attention model that cannot see the
answer's source stays at chance), and bad input refused with one line."""

import json

import numpy as np
import pytest

from griffon.cli import main
from griffon.probes.study import (
    Accuracy,
    differences,
    example_seq_len,
    examples,
    interval,
    probe_data,
    probe_examples,
    summarize,
)
from griffon.probes.tasks import TASKS, get_task, symbols


@pytest.mark.parametrize("name", list(TASKS))
@pytest.mark.parametrize("spaced", [False, True])
def test_every_answer_follows_from_its_prompt(name, spaced):
    task = get_task(name)
    rng = np.random.default_rng(0)
    for length in (task.min_length, task.min_length + 5, 3 * task.min_length + 7):
        for _ in range(50):
            ex = task.example(rng, length, spaced)
            assert task.solve(ex.prompt) == ex.answer
    copy = get_task("selective-copy").example(rng, 100, spaced)
    assert len(symbols(copy.prompt)) == 101 and len(symbols(copy.answer)) == 16
    assert (" " in copy.prompt) == spaced and copy.answer.startswith(" ") == spaced
    book = get_task("phonebook").example(rng, 10, spaced)
    assert book.prompt.count("\n") == 12 and len(book.answer) == 7  # 10 entries, 2 worked lookups


def test_task_parameters_change_the_examples_and_bad_ones_are_refused():
    rng = np.random.default_rng(1)
    copy = get_task("selective-copy", ["data_tokens=5", "vocab=3"]).example(rng, 40)
    assert len(copy.answer) == 5 and set(copy.answer) <= set("abc")
    book = get_task("phonebook", ["digits=3", "worked=0"]).example(rng, 4)
    assert len(book.answer) == 3 and book.prompt.count("?") == 1
    assert get_task("induction", ["vocab=2"]).example(rng, 50).answer in "ab"
    for name, params, message in (
        ("induction", ["digits=3"], "bad probe parameter 'digits=3'; induction takes vocab"),
        ("phonebook", ["digits"], "bad probe parameter 'digits'"),
        ("phonebook", ["digits=x"], "digits must be an integer, got 'x'"),
        ("selective-copy", ["vocab=27"], "vocab must be between 2 and 26, got 27"),
        ("selective-copy", ["data_tokens=0"], "data_tokens must be at least 1, got 0"),
    ):
        with pytest.raises(ValueError, match=message):
            get_task(name, params)
    assert get_task("selective-copy", ["data_tokens=30"]).min_length == 30


@pytest.mark.parametrize("name", list(TASKS))
def test_the_loss_covers_exactly_the_answer(name):
    task = get_task(name)
    rng = np.random.default_rng(3)
    want = [task.example(rng, task.min_length + 4) for _ in range(5)]
    for (ids, mask), ex in zip(examples(task, 5, task.min_length + 4, seed=3), want, strict=True):
        assert bytes(ids) == (ex.prompt + ex.answer).encode()
        assert bytes(t for t, m in zip(ids, mask, strict=True) if m) == ex.answer.encode()
        assert mask == sorted(mask)  # the answer is the end of the example
    train, val = probe_examples(task, task.min_length + 4, 20, 4, seed=0)
    data = probe_data(train, val, example_seq_len(train, val))
    assert data.train.targets.sum() == sum(len(ex.answer.encode()) for ex in (task.example(
        np.random.default_rng(0), task.min_length + 4) for _ in range(20)))  # fmt: skip


def test_answers_are_scored_symbol_by_symbol():
    task = get_task("selective-copy")
    rng = np.random.default_rng(5)
    for spaced in (False, True):
        ex = task.example(rng, 40, spaced)
        a = Accuracy(40)
        a.add(ex.answer, task.solve(ex.prompt) + " . trailing text")  # what follows the answer is not read
        wrong = "z" + symbols(ex.answer)[1:]
        a.add(ex.answer, wrong)
        a.add(ex.answer, symbols(ex.answer)[:8])  # cut short: half its symbols
        assert (a.correct, a.total, a.symbols_right, a.symbols_total) == (1, 3, 16 + 15 + 8, 48)


def test_intervals_over_seeds_and_paired_differences():
    one = interval([0.5])
    assert one["mean"] == 0.5 and np.isnan(one["lo"])
    two = interval([0.0, 1.0])  # t(0.975, 1) = 12.706: half width 12.706 * 0.7071 / 1.4142
    assert two["mean"] == 0.5 and two["hi"] - 0.5 == pytest.approx(6.3531, abs=1e-3)
    runs = {f: {"runs": [{"seed": s, "curve": [[10, 0, v + (f == "hawk") * d]], "reached": False, "accuracy": {}} for s, v, d in
                         ((0, 0.2, 0.1), (1, 0.6, 0.3), (2, 0.9, 0.2))]} for f in ("mqa", "hawk")}  # fmt: skip
    runs["hawk"]["runs"][1]["curve"].insert(0, [5, 0, 0.0])  # a resumed run's extra checkpoint, left out
    diff = differences(runs, "mqa")["hawk-mqa"]
    assert len(diff) == 1 and diff[0][0] == 10 and diff[0][1]["mean"] == pytest.approx(0.2) and diff[0][1]["n"] == 3
    curve = summarize(runs["hawk"]["runs"])["curve"]
    assert [s for s, _ in curve] == [10] and curve[0][1]["mean"] == pytest.approx((0.3 + 0.9 + 1.1) / 3)


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
    assert seeing["runs"][0]["accuracy"]["24"] >= 0.9 and seeing["runs"][0]["reached"]
    assert seeing["summary"]["reached"] == 1 and seeing["summary"]["accuracy"]["24"]["mean"] >= 0.9
    assert blind["runs"][0]["accuracy"]["24"] <= 0.25 and not blind["runs"][0]["reached"]
    assert blind["summary"]["accuracy"] == {}  # a run that did not learn the task is not read at other lengths


def test_bad_probe_requests_get_one_line(tmp_path, capsys):
    out = str(tmp_path / "p")
    for argv, message in (
        (["induction", "--models", "rwkv"], "unknown model family 'rwkv'"),
        (["induction", "--train-length", "2"], "length 2 is below the task's minimum 3"),
        (["selective-copy", "--lengths", "8"], "length 8 is below the task's minimum 16"),
        (["induction", "--models", "mqa", "--set", "model.max_seq_len=32"], "beyond model.max_seq_len=32"),
        (["induction", "--set", "model.vocab_size=64"], "model.vocab_size must be at least 256"),
        (["phonebook", "--param", "pages=3"], "bad probe parameter 'pages=3'"),
        (["induction", "--train-length", "0"], "length 0 is below the task's minimum 3"),
        (["induction", "--window", "0"], "--window must be at least 1, got 0"),
        (["phonebook", "--train-length", "5000"], "length 5000 is above the task's maximum 1872"),
        (["induction", "--train-length", "1000000000"], "GiB free here: lower the lengths or the examples"),
        (["selective-copy", "--lengths", "100000000"], "selective-copy at training length 256 and lengths up to"),
    ):
        assert main(["probe", "train", *argv, "--out", out]) == 2, argv
        assert message in capsys.readouterr().err, argv
        assert not (tmp_path / "p").exists()
    with pytest.raises(ValueError, match="unknown probe task 'copy'"):
        get_task("copy")
    from griffon.checkpoint import save_pretrained
    from griffon.data.tokenizers import ByteTokenizer
    from griffon.model import Griffon
    from griffon.presets import get_preset

    save_pretrained(Griffon(get_preset("hawk-tiny")), tmp_path / "ckpt")
    ByteTokenizer().save(tmp_path / "ckpt")
    for lengths, message in ((["0"], "length 0 is below"), (["2000000000"], "GiB free here")):
        assert main(["probe", "eval", str(tmp_path / "ckpt"), "induction", "--lengths", *lengths]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1


def test_a_subword_checkpoint_is_probed_on_spaced_text(tmp_path, capsys):
    """A BPE checkpoint reads copying and induction spaced, so that no token spans two symbols (side
    by side, merges would); ``probe eval`` runs on it (random weights: the figure is not the point,
    the rendering is)."""
    from griffon.checkpoint import save_pretrained
    from griffon.data.corpus import default_corpus
    from griffon.data.sources import iter_documents
    from griffon.data.tokenizers import train_bpe
    from griffon.model import Griffon
    from griffon.presets import get_preset

    tok = train_bpe((t[:20000] for t in iter_documents(default_corpus())), 400, tmp_path / "run" / "tokenizer.json")
    ex = get_task("induction").example(np.random.default_rng(0), 30, spaced=True)
    assert max(len(symbols(tok.decode([t]))) for t in tok.encode(ex.prompt + ex.answer)) == 1
    side_by_side = get_task("induction").example(np.random.default_rng(0), 30)
    assert max(len(symbols(tok.decode([t]))) for t in tok.encode(side_by_side.prompt)) > 1
    save_pretrained(Griffon(get_preset("griffin-tiny", vocab_size=400)), tmp_path / "run" / "checkpoints" / "step_1")
    assert main(["probe", "eval", str(tmp_path / "run"), "induction", "--lengths", "30", "--eval-examples", "8"]) == 0
    assert "induction length 30 (spaced): " in capsys.readouterr().out


def test_a_finished_study_takes_more_seeds_under_its_own_settings(tmp_path, capsys):
    out = str(tmp_path / "study")
    argv = ["probe", "train", "induction", "--models", "hawk", "--out", out, "--train-length", "16", "--lengths", "16",
            "--steps", "10", "--examples", "64", "--eval-examples", "8"]  # fmt: skip
    assert main([*argv, "--seeds", "0"]) == 0
    first = json.loads((tmp_path / "study" / "results.json").read_text())["models"]["hawk"]["runs"]
    stamps = [p.stat().st_mtime_ns for p in (tmp_path / "study" / "hawk-s0" / "checkpoints").rglob("*")]
    assert main([*argv, "--seeds", "0", "1"]) == 0
    both = json.loads((tmp_path / "study" / "results.json").read_text())["models"]["hawk"]["runs"]
    assert [r["seed"] for r in both] == [0, 1] and both[0]["curve"] == first[0]["curve"]
    held = json.loads((tmp_path / "study" / "results.json").read_text())
    assert held["window"] is None and held["models"]["hawk"]["attention_window"] is None  # no Griffin trained
    assert both[0]["accuracy"] == first[0]["accuracy"]
    assert [p.stat().st_mtime_ns for p in (tmp_path / "study" / "hawk-s0" / "checkpoints").rglob("*")] == stamps
    capsys.readouterr()
    assert main([*argv[:-6], "--steps", "20", *argv[-4:], "--seeds", "2"]) == 2
    assert "holds a probe study with other settings (steps)" in capsys.readouterr().err
    assert not (tmp_path / "study" / "hawk-s2").exists()
