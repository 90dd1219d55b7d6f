"""DPO and QRPO runs: examples checked, reference log-probabilities stored once and equal to a fresh
forward, the first step's loss as the formulas give it at pi = pi_ref, and a resume that reads the
stored references."""

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from griffon.align.dpo import DPO
from griffon.align.preference import (
    PreferenceData,
    PreferenceLoader,
    read_preference_examples,
    reference_logps,
    sequence_logps,
)
from griffon.align.qrpo import QRPO, qrpo_log_partition
from griffon.checkpoint import from_pretrained, resolve
from griffon.cli import main
from griffon.data.sources import DataError

TINY = [
    "data.seq_len=32", "data.batch_size=4", "dtype=fp32", "max_minutes=null", "max_steps=3",
    "eval_batches=2", "final_eval_batches=2", "eval_every=100", "log_every=1", "optim.warmup_steps=1",
]  # fmt: skip
OBJECTIVE = {"dpo": DPO, "qrpo": QRPO}


def _examples(kind, n=24):
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        a, b = (int(x) for x in rng.integers(0, 50, 2))
        if kind == "dpo":
            out.append({"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + int(rng.integers(1, 9)))})
        else:
            guess = a + b + int(rng.integers(-3, 4))
            out.append({"prompt": f"{a}+{b}=", "completion": str(guess), "reward": -abs(guess - a - b),
                        "ref_rewards": [-float(x) for x in rng.integers(0, 5, 6)]})  # fmt: skip
    return out


def _write(path, examples):
    path.write_text("".join(json.dumps(e) + "\n" for e in examples))
    return path


def _train(out, *extra):
    assert main(["train", "--out", str(out), *[f"--set={s}" for s in TINY], *extra]) == 0


def _records(run):
    return [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    out = tmp_path_factory.mktemp("base") / "run"
    _train(out, "--set=model=griffin-tiny")
    return out


@pytest.mark.parametrize("kind", ["dpo", "qrpo"])
def test_an_alignment_run_starts_at_the_reference_and_stores_it(tmp_path, base, kind):
    data = _write(tmp_path / f"{kind}.jsonl", _examples(kind))
    _train(tmp_path / "run", "--init", str(base), f"--set=objective={kind}", f"--set=data.path={data}",
           "--set=beta=0.2", "--set=max_steps=6", "--set=optim.lr=3e-3", "--set=save_every=3")  # fmt: skip
    model = from_pretrained(resolve(base)[0]).eval()
    prepared = PreferenceData.open(OBJECTIVE[kind], str(data), "bytes", 32, 0.1, 0, 256)
    stored = load_file(str(tmp_path / "run" / "reference_logps.safetensors"))
    # the stored references are the initial model's, as a fresh forward computes them
    assert torch.allclose(stored["train"], reference_logps(model, prepared.train, torch.device("cpu"), 5), atol=1e-5)
    assert torch.allclose(stored["val"], reference_logps(model, prepared.val, torch.device("cpu"), 5), atol=1e-5)
    records = _records(tmp_path / "run")
    first = next(r for r in records if r["kind"] == "train")
    # at step 1 the policy is the reference: DPO's loss is log 2, QRPO's the targets' mean square
    if kind == "dpo":
        assert first["loss"] == pytest.approx(math.log(2), abs=1e-5) and first["margins"] == pytest.approx(0, abs=1e-5)
    else:
        _, _, _, index = next(PreferenceLoader(prepared.train, 4, seed=0))
        q = torch.from_numpy(prepared.train.values["quantile"][index.numpy()])
        assert first["loss"] == pytest.approx(((q - 0.2 * qrpo_log_partition(0.2)) ** 2).mean().item(), rel=1e-5)
        assert first["kl_ref"] == pytest.approx(0, abs=1e-5)
    final = next(r for r in records if r["kind"] == "final_eval")
    assert math.isfinite(final["val_loss"]) and "val_kl_ref" in final
    # a resume reads the stored references (they would differ if recomputed from the trained model)
    before = (tmp_path / "run" / "reference_logps.safetensors").read_bytes()
    assert main(["train", "--resume", str(tmp_path / "run"), "--set=max_steps=8"]) == 0
    assert (tmp_path / "run" / "reference_logps.safetensors").read_bytes() == before


def test_sequence_logps_sum_the_completion_tokens_only():
    from griffon import Griffon, get_preset

    torch.manual_seed(0)
    model = Griffon(get_preset("griffin-tiny")).eval()
    tokens = torch.randint(0, 256, (2, 9))
    seg = torch.arange(9).expand(2, 9)
    targets = torch.zeros(2, 9, dtype=torch.bool)
    targets[:, 5:] = True
    with torch.no_grad():
        logps = sequence_logps(model, tokens, seg, targets)
        full = torch.log_softmax(model(tokens[:, :-1], seg[:, :-1])[0], -1)
    want = full[:, 4:, :].gather(-1, tokens[:, 5:, None])[..., 0].sum(1)
    assert torch.allclose(logps, want, atol=1e-5)


@pytest.mark.parametrize(
    "kind, line, message",
    [
        ("dpo", '{"prompt": "a", "chosen": "b"}', ":2: 'rejected' must be a string"),
        ("dpo", '{"prompt": "a", "chosen": "", "rejected": "c"}', ":2: 'chosen' is empty"),
        ("dpo", '{"prompt": "a", "chosen": "b", "rejected": "b"}', ":2: 'chosen' and 'rejected' are the same text"),
        (
            "qrpo",
            '{"prompt": "a", "completion": "b", "reward": 1' + "0" * 400 + ', "ref_rewards": [1, 2]}',
            "'reward' must be a finite",
        ),
        (
            "qrpo",
            '{"prompt": "a", "completion": "b", "reward": NaN, "ref_rewards": [1, 2]}',
            "'reward' must be a finite",
        ),
        ("qrpo", '{"prompt": "a", "completion": "b", "reward": 1, "ref_rewards": [1]}', "2 or more finite numbers"),
    ],
)
def test_bad_examples_name_the_file_and_line(tmp_path, kind, line, message):
    good = json.dumps(_examples(kind, 1)[0])
    path = tmp_path / "x.jsonl"
    path.write_text(good + "\n" + line + "\n")
    with pytest.raises(DataError, match=message):
        read_preference_examples(path, OBJECTIVE[kind])


def test_alignment_needs_a_starting_model(tmp_path, capsys):
    data = _write(tmp_path / "d.jsonl", _examples("dpo"))
    assert main(["train", "--out", str(tmp_path / "r"), "--set=objective=dpo", f"--set=data.path={data}"]) == 2
    assert "objective=dpo aligns a trained model against itself: start with --init SRC" in capsys.readouterr().err


def test_pairs_with_nothing_to_learn_within_seq_len_are_refused_when_most_are(tmp_path):
    """DPO with prompts longer than seq_len trained at loss log 2 with zero gradient: a pair teaches
    only where both rows have a completion token and they differ within the row."""
    from griffon.align.preference import PreferenceData

    same_start = [{"prompt": "p" * 10, "chosen": "a" * 30 + "1", "rejected": "a" * 30 + "2"} for _ in range(20)]
    data = _write(tmp_path / "d.jsonl", same_start + _examples("dpo", 4))
    with pytest.raises(DataError, match=r"^20 of the 24 examples .* data.seq_len=32; data.seq_len=40 would keep them"):
        PreferenceData.open(DPO, str(data), "bytes", 32, 0.1, 0, 256)
    assert PreferenceData.open(DPO, str(data), "bytes", 40, 0.1, 0, 256).unlearnable == 0
    long = [{"prompt": "p" * 40, "completion": "b", "reward": 1, "ref_rewards": [0, 1]}] * 3
    some = _write(tmp_path / "q.jsonl", long + _examples("qrpo", 21))
    assert PreferenceData.open(QRPO, str(some), "bytes", 32, 0.1, 0, 256).unlearnable == 3
