"""``griffon rewards``: a reference policy's completions, scored, as QRPO and DPO data; resumable."""

import json

import pytest
import torch

from griffon import Griffon
from griffon.align.dpo import DPO
from griffon.align.preference import read_preference_examples
from griffon.align.qrpo import QRPO
from griffon.checkpoint import save_pretrained
from griffon.cli import main
from griffon.config import ModelConfig
from griffon.data.tokenizers import ByteTokenizer

PROMPTS = ["To be", "or not", "that is", "the question", "whether"]
REWARDS = """
import math

def vowels(prompt, completion):
    return sum(c in "aeiou" for c in completion) - 0.1 * len(prompt)

def broken(prompt, completion):
    return math.nan

def huge(prompt, completion):
    return 10**400

def numpy_float(prompt, completion):
    import numpy as np

    return np.float32(len(completion))
"""


@pytest.fixture
def setup(tmp_path, monkeypatch):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=256, width=32, num_layers=2, num_heads=2, num_kv_heads=1, mlp_width=48,
                      attention_window=8)  # fmt: skip
    save_pretrained(Griffon(cfg), tmp_path / "policy")
    ByteTokenizer().save(tmp_path / "policy")
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    (tmp_path / "my_rewards.py").write_text(REWARDS)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _argv(tmp, out="q.jsonl", *extra):
    return ["rewards", str(tmp / "prompts.jsonl"), "--policy", str(tmp / "policy"), "--reward", "my_rewards:vowels",
            "--n", "3", "--out", str(tmp / out), "--max-tokens", "6", "--max-batch", "4", *extra]  # fmt: skip


def test_completions_are_scored_and_written_as_qrpo_and_dpo_data(setup, capsys):
    tmp = setup
    assert main(_argv(tmp, "q.jsonl", "--dpo-out", str(tmp / "d.jsonl"))) == 0
    rows = read_preference_examples(tmp / "q.jsonl", QRPO)  # what objective=qrpo reads
    assert [r["prompt"] for r in rows] == [p for p in PROMPTS for _ in range(3)]
    for first in range(0, len(rows), 3):
        group = rows[first : first + 3]
        rewards = [sum(c in "aeiou" for c in r["completion"]) - 0.1 * len(r["prompt"]) for r in group]
        assert [r["reward"] for r in group] == pytest.approx(rewards)
        assert all(r["ref_rewards"] == pytest.approx(rewards) for r in group)
        assert len({r["completion"] for r in group}) > 1  # sampled, each with its own seed
    pairs = read_preference_examples(tmp / "d.jsonl", DPO)
    for pair in pairs:
        group = [r for r in rows if r["prompt"] == pair["prompt"]]
        score = {r["completion"]: r["reward"] for r in group}
        assert score[pair["chosen"]] == max(score.values()) > score[pair["rejected"]] == min(score.values())


def test_a_killed_run_resumes_to_the_same_file(setup, capsys):
    tmp = setup
    assert main(_argv(tmp, "whole.jsonl")) == 0
    whole = (tmp / "whole.jsonl").read_text()
    lines = whole.splitlines(keepends=True)
    (tmp / "cut.jsonl").write_text("".join(lines[:4]) + lines[4][:10])  # a prompt, a line of the next, half a line
    (tmp / "cut.jsonl.source.json").write_text((tmp / "whole.jsonl.source.json").read_text())  # as the run wrote it
    assert main(_argv(tmp, "cut.jsonl")) == 0
    assert (tmp / "cut.jsonl").read_text() == whole
    assert "4 prompts sampled now" in capsys.readouterr().out


def test_bad_rewards_and_arguments_get_one_line(setup, capsys):
    tmp = setup
    argv = _argv(tmp)
    for change, message in (
        (("--reward", "my_rewards:broken"), "prompts.jsonl:1: the reward of"),
        (("--reward", "my_rewards:broken"), "is nan, not a finite real number"),
        (("--reward", "my_rewards:huge"), "not a finite real number"),
        (("--reward", "my_rewards"), "give module:function"),
        (("--reward", "no_such_module:f"), "cannot import no_such_module"),
        (("--reward", "my_rewards:missing"), "has no callable 'missing'"),
        (("--n", "1"), "--n must be at least 2"),
    ):
        i = argv.index(change[0])
        assert main(argv[:i] + list(change) + argv[i + 2 :]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("error:") == 1, err
        (tmp / "q.jsonl").unlink(missing_ok=True)
        (tmp / "q.jsonl.source.json").unlink(missing_ok=True)
    assert main(_reward(argv, "my_rewards:numpy_float")) == 0  # any real number type


def test_an_output_is_never_mixed_or_an_input_overwritten(setup, capsys):
    """A rerun into the same --out with other arguments is refused (resuming needs the same ones),
    as is --out naming an input; listing and then scoring into one file is refused too."""
    tmp = setup
    assert main(_argv(tmp, "q.jsonl")) == 0
    first = (tmp / "q.jsonl").read_text()
    (tmp / "other.jsonl").write_text(json.dumps({"prompt": "Hark"}) + "\n")
    for argv, message in (
        (_argv(tmp, "q.jsonl", "--seed", "1"), "holds the output of a run with other seed"),
        ([*_argv(tmp, "q.jsonl")[:-2], "--max-batch", "4", "--n", "4"], "other n"),
        (["rewards", str(tmp / "other.jsonl"), *_argv(tmp, "q.jsonl")[2:]], "other prompts"),
        (_reward(_argv(tmp, "q.jsonl")), "other reward"),
        (_argv(tmp, "prompts.jsonl"), "is the prompts file"),
        (_argv(tmp, "d.jsonl", "--dpo-out", str(tmp / "d.jsonl")), "--dpo-out and --out are the same file"),
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("error:") == 1, (argv, err)
    assert (tmp / "q.jsonl").read_text() == first
    assert json.loads((tmp / "prompts.jsonl").read_text().splitlines()[0]) == {"prompt": PROMPTS[0]}
    assert main(_reward(_argv(tmp, "listed.jsonl"))) == 0
    scores = tmp / "scores.jsonl"
    scores.write_text(json.dumps({"prompt": "a", "completion": "b", "reward": 10**400}) + "\n")
    assert main(_reward(_argv(tmp, "x.jsonl"), str(scores))) == 2
    assert "scores.jsonl:1: 'reward' is" in capsys.readouterr().err
    scores.write_text("")
    assert main(_reward(_argv(tmp, "listed.jsonl"), str(scores))) == 2
    assert "other reward" in capsys.readouterr().err


def test_more_completions_than_the_engine_queues_are_fed_in_parts(setup):
    tmp = setup
    (tmp / "one.jsonl").write_text(json.dumps({"prompt": "To be"}) + "\n")
    argv = ["rewards", str(tmp / "one.jsonl"), "--policy", str(tmp / "policy"), "--reward", "my_rewards:vowels",
            "--n", "300", "--out", str(tmp / "many.jsonl"), "--max-tokens", "2", "--max-batch", "4"]  # fmt: skip
    assert main(argv) == 0  # the engine queues 4 + 256
    rows = [json.loads(x) for x in (tmp / "many.jsonl").read_text().splitlines()]
    assert len(rows) == 300 and all(len(r["ref_rewards"]) == 300 for r in rows)


def _reward(argv, value=None):
    """``argv`` with its --reward replaced by ``value`` (dropped if None)."""
    i = argv.index("--reward")
    return argv[:i] + (["--reward", value] if value else []) + argv[i + 2 :]


def test_completions_scored_elsewhere_come_back_as_a_table_of_rewards(setup, capsys):
    """Without --reward the completions alone are listed; scored outside (here: by the same
    function) and given back as a JSONL, they make the same dataset the function makes."""
    tmp = setup
    assert main(_reward(_argv(tmp, "listed.jsonl"))) == 0
    listed = [json.loads(x) for x in (tmp / "listed.jsonl").read_text().splitlines()]
    assert [set(r) for r in listed] == [{"prompt", "completion"}] * 15
    scored = [r | {"reward": sum(c in "aeiou" for c in r["completion"]) - 0.1 * len(r["prompt"])} for r in listed]
    (tmp / "scores.jsonl").write_text("".join(json.dumps(r) + "\n" for r in scored))
    assert main(_reward(_argv(tmp, "q.jsonl"), str(tmp / "scores.jsonl"))) == 0
    assert main(_argv(tmp, "direct.jsonl")) == 0
    assert (tmp / "q.jsonl").read_text() == (tmp / "direct.jsonl").read_text()
    (tmp / "scores.jsonl").write_text(json.dumps(scored[0]) + "\n")
    assert main(_reward(_argv(tmp, "x.jsonl"), str(tmp / "scores.jsonl"))) == 2
    assert "has no reward for the completion" in capsys.readouterr().err
