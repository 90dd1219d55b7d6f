"""``griffon rewards``: a reference policy's completions, scored, as QRPO and DPO data; resumable."""

import json

import pytest
import torch

from griffon import Griffon
from griffon.align.preference import read_preference_examples
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
    rows = read_preference_examples(tmp / "q.jsonl", "qrpo")  # what objective=qrpo reads
    assert [r["prompt"] for r in rows] == [p for p in PROMPTS for _ in range(3)]
    for first in range(0, len(rows), 3):
        group = rows[first : first + 3]
        rewards = [sum(c in "aeiou" for c in r["completion"]) - 0.1 * len(r["prompt"]) for r in group]
        assert [r["reward"] for r in group] == pytest.approx(rewards)
        assert all(r["ref_rewards"] == pytest.approx(rewards) for r in group)
        assert len({r["completion"] for r in group}) > 1  # sampled, each with its own seed
    pairs = read_preference_examples(tmp / "d.jsonl", "dpo")
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
    assert main(_argv(tmp, "cut.jsonl")) == 0
    assert (tmp / "cut.jsonl").read_text() == whole
    assert "4 prompts sampled now" in capsys.readouterr().out


def test_bad_rewards_and_arguments_get_one_line(setup, capsys):
    tmp = setup
    argv = _argv(tmp)
    for change, message in (
        (("--reward", "my_rewards:broken"), "is nan, not a finite number"),
        (("--reward", "my_rewards"), "give module:function"),
        (("--reward", "no_such_module:f"), "cannot import no_such_module"),
        (("--reward", "my_rewards:missing"), "has no callable 'missing'"),
        (("--n", "1"), "--n must be at least 2"),
    ):
        i = argv.index(change[0])
        assert main(argv[:i] + list(change) + argv[i + 2 :]) == 2
        assert message in capsys.readouterr().err


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
