"""``model=auto``: the planner's choice against its own rule, BPE where it pays and not where it
does not, the machine probe, the law file, raw corpora prepared into the run (a BPE trained on
the training documents only), calibration end to end, and ``griffon train`` choosing by default."""

import json
import math
import random

import pytest

from griffon.cli import main
from griffon.config import ConfigError
from griffon.data.prepare import read_meta, validation_ids
from griffon.data.sources import iter_documents
from griffon.data.tokenizers import load_tokenizer
from griffon.data.training_data import TrainingData
from griffon.scaling import auto
from griffon.scaling.auto import MIN_STEPS, Machine, effective_bytes
from griffon.scaling.law import ScalingLaw, shipped_law_path
from griffon.train.config import TrainConfig
from griffon.train.logging import read_records
from griffon.train.optim import lr_at
from griffon.train.trainer import prepare_data

LAW = ScalingLaw(E=1.0, A=20.0, alpha=0.3, B=200.0, beta=0.3, source={"machine": "test"})
MACHINE = Machine(overhead=0.0, flops_per_s=5e10, probes=[])


def _words(n_docs: int, words_per_doc: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    vocab = ["alpha", "beta", "gamma", "delta", "epsilon", "return", "lambda", "import", "value", "print"]
    return [" ".join(rng.choice(vocab) for _ in range(words_per_doc)) + "\n" for _ in range(n_docs)]


def _noise(n_docs: int, chars_per_doc: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(chr(rng.randrange(33, 127)) for _ in range(chars_per_doc)) for _ in range(n_docs)]


def _corpus(path, docs):
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def _auto_cfg(path, **changes):
    d = TrainConfig().to_dict() | {"model": "auto"} | changes
    d["data"] = {**d["data"], "path": str(path)}
    return d


def test_effective_bytes_discounts_repetition():
    assert effective_bytes(5e5, 1e6) == 5e5
    values = [effective_bytes(d, 1e6) for d in (1e6, 2e6, 4e6, 1e8)]
    assert values[0] == 1e6 and all(a < b for a, b in zip(values, values[1:], strict=False))
    assert values[1] < 2e6 and values[-1] < 1e6 * (1 + auto.REPEAT_HALF_LIFE)
    assert effective_bytes(1e12, 1e6) == pytest.approx(1e6 * (1 + auto.REPEAT_HALF_LIFE))


def test_plan_chooses_the_lowest_prediction(tmp_path):
    corpus = _corpus(tmp_path / "c.jsonl", _words(60, 400))
    plan = auto.plan(
        _auto_cfg(corpus, max_minutes=1.0), TrainingData.resolve(corpus), LAW, "law.json", MACHINE, widths=(64, 96, 128)
    )
    seconds = 60 - plan.planning_s
    finite = [c for c in plan.candidates if math.isfinite(c.predicted_bpb)]
    assert plan.chosen.predicted_bpb == min(c.predicted_bpb for c in finite)
    for c in plan.candidates:  # each prediction follows the documented rule
        tokens = MACHINE.tokens_per_s(c.flops_per_token) * seconds
        assert c.tokens == pytest.approx(tokens, rel=0.02)
        if c.steps >= MIN_STEPS:
            d = effective_bytes(c.tokens * c.bytes_per_token, plan.unique_bytes)
            assert c.predicted_bpb == pytest.approx(LAW.predict(c.non_embedding_params, d), rel=1e-3)
        else:
            assert c.predicted_bpb == math.inf
    cfg = TrainConfig.from_dict(plan.config)
    assert cfg.model.width == plan.chosen.width and cfg.model.vocab_size == plan.chosen.vocab_size
    assert cfg.data.tokenizer == plan.chosen.tokenizer and cfg.optim.lr == auto.auto_lr(plan.chosen.width)
    assert cfg.max_minutes < 1.0  # planning is paid out of the budget
    assert cfg.max_tokens == plan.chosen.steps * auto.SEQ_LEN * auto.BATCH  # its epochs, not one
    assert "<- chosen" in plan.explain()


def test_bpe_where_it_pays(tmp_path):
    """Repetitive words compress well under a BPE: with a law that rewards data, a BPE wins. Random
    printable characters barely compress, and the bigger output layer makes bytes the better buy."""
    words = _corpus(tmp_path / "words.jsonl", _words(60, 400))
    noise = _corpus(tmp_path / "noise.jsonl", _noise(60, 2000))
    plan_words = auto.plan(
        _auto_cfg(words, max_minutes=None, max_flops=2e13), TrainingData.resolve(words), LAW, "law", widths=(64, 96)
    )
    plan_noise = auto.plan(
        _auto_cfg(noise, max_minutes=None, max_flops=2e13), TrainingData.resolve(noise), LAW, "law", widths=(64, 96)
    )
    assert plan_words.chosen.tokenizer.startswith("bpe-") and plan_words.chosen.bytes_per_token > 3
    assert plan_noise.chosen.tokenizer == "bytes"


def test_prepared_data_keeps_its_tokenizer(tmp_path):
    corpus = _corpus(tmp_path / "c.jsonl", _words(40, 300))
    cfg = TrainConfig.from_dict(_auto_cfg(corpus) | {"model": "griffin-tiny"})
    data = prepare_data(cfg, TrainingData.resolve(cfg.data.path), tmp_path / "run" / "data", is_main=True)
    plan = auto.plan(
        _auto_cfg(data, max_minutes=None, max_flops=2e13), TrainingData.resolve(data), LAW, "law", widths=(64, 96)
    )
    assert {c.tokenizer for c in plan.candidates} == {str(data)}
    assert plan.config["data"]["path"] == str(data) and plan.config["data"]["tokenizer"] == "bytes"


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"max_minutes": None}, "needs a time or FLOP budget"),
        ({"max_minutes": None, "max_flops": 1e9}, "too small"),
        ({"max_minutes": 0.1}, "max_minutes=0.1 is shorter than model=auto needs"),
    ],
)
def test_plan_refuses_budgets_it_cannot_use(tmp_path, changes, message):
    corpus = _corpus(tmp_path / "c.jsonl", _words(20, 100))
    with pytest.raises(ConfigError, match=message):
        auto.plan(_auto_cfg(corpus, **changes), TrainingData.resolve(corpus), LAW, "law", MACHINE, widths=(64,))


def test_measure_machine():
    m = auto.measure_machine(auto.torch.device("cpu"), widths=(32, 48, 64), steps=1)
    assert m.flops_per_s > 1e8 and m.overhead >= 0 and len(m.probes) == 3
    assert m.tokens_per_s(1e6) > m.tokens_per_s(1e7) > 0


def test_law_file_round_trip_and_errors(tmp_path):
    LAW.save(tmp_path / "law.json")
    assert ScalingLaw.load(tmp_path / "law.json") == LAW
    (tmp_path / "bad.json").write_text('{"E": 1}')
    with pytest.raises(ConfigError, match="not a scaling law file"):
        ScalingLaw.load(tmp_path / "bad.json")
    shipped = ScalingLaw.load(shipped_law_path())
    assert shipped.alpha > 0 and shipped.beta > 0 and shipped.source["machine"]


def test_bpe_is_trained_on_training_documents_only(tmp_path):
    """``data.tokenizer=bpe-N`` on a raw corpus: the held-out documents' own strings never become tokens."""
    docs = _words(10, 200)
    (held,) = validation_ids(len(docs), 0.1, seed=0)
    docs[held] = "zqxjv " * 500
    corpus = _corpus(tmp_path / "c.jsonl", docs)
    cfg = TrainConfig.from_dict(
        _auto_cfg(corpus) | {"model": {**TrainConfig().model.to_dict(), "vocab_size": 300}}
        | {"data": {"path": str(corpus), "tokenizer": "bpe-300"}}
    )  # fmt: skip
    data = prepare_data(cfg, TrainingData.resolve(cfg.data.path), tmp_path / "run" / "data", is_main=True)
    tok = load_tokenizer(data)
    assert read_meta(data)["tokenizer"]["vocab_size"] == tok.vocab_size == 300
    assert len(tok.encode("zqxjv")) >= 4  # not merged: its only occurrences are held out
    assert len(tok.encode(" alpha")) == 1  # the training documents' words are


def test_directory_of_text_files(tmp_path):
    root = tmp_path / "tree"
    (root / "sub").mkdir(parents=True)
    (root / "a.py").write_text("print(1)\n")
    (root / "sub" / "b.log").write_text("line\n")
    (root / "c.bin").write_bytes(b"\xff\xfe\x00")
    (root / ".hidden").write_text("secret\n")
    assert list(iter_documents(root)) == ["print(1)\n", "line\n"]


def test_calibration_end_to_end(tmp_path):
    from griffon.scaling.calibrate import calibrate

    law = calibrate(tmp_path / "cal", tmp_path / "law.json", widths=(32, 48, 64), flops=(2e9, 6e9), min_steps=1)
    assert ScalingLaw.load(tmp_path / "law.json") == law
    rows = (tmp_path / "cal" / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + 6 and law.source["runs"] == 6


def test_train_chooses_the_model_by_default(tmp_path, capsys, monkeypatch):
    """``griffon train`` without a model plans one (here for a FLOP budget only the smallest width
    can use) and records why in ``auto.json``; naming a model turns planning off."""
    monkeypatch.setattr(auto, "WIDTHS", (64, 96))
    corpus = _corpus(tmp_path / "c.jsonl", _words(40, 400))
    run = tmp_path / "run"
    budget = 1.02 * MIN_STEPS * auto.SEQ_LEN * auto.BATCH * auto.train_flops_per_token(auto.auto_model(64), 256)
    args = ["train", "--set", f"data.path={corpus}", "--set", "max_minutes=null", "--set", f"max_flops={budget}",
            "--set", "eval_every=1000", "--set", "final_eval_batches=2", "--set", "optim.lr=1.5e-3",
            "--out", str(run)]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "model=auto" in out and "<- chosen" in out and "learning rate: 0.0015" in out
    plan = json.loads((run / "auto.json").read_text())
    cfg = TrainConfig.load(run / "config.json")
    assert plan["chosen"]["width"] == cfg.model.width == 64 and cfg.data.tokenizer == "bytes"
    assert cfg.optim.lr == 1.5e-3  # the user's, not the plan's (auto_lr(64) = 0.006)
    assert read_meta(run / "data")["sources"] == [str(corpus)]
    # a model named: griffin-demo with the change, no planning (192 is not divisible by 5 heads)
    assert main(["train", "--set", "model.num_heads=5", "--out", str(tmp_path / "r2")]) == 2
    captured = capsys.readouterr()
    assert "model=auto" not in captured.out and "width 192 is not divisible by num_heads 5" in captured.err


def test_a_tiny_corpus_is_refused_before_planning(tmp_path, monkeypatch):
    corpus = _corpus(tmp_path / "c.jsonl", ["twenty-two bytes here\n"] * 10)
    monkeypatch.setattr(auto, "_bytes_per_token", lambda *a: pytest.fail("a tokenizer was trained"))
    with pytest.raises(
        ConfigError, match="the corpus holds 198 bytes of training text; model=auto needs at least 2,049"
    ):
        auto.plan(_auto_cfg(corpus), TrainingData.resolve(corpus), LAW, "law", MACHINE, widths=(64,))


def test_bad_budgets_are_refused_by_the_config(tmp_path):
    for key, value in (("max_minutes", -1), ("max_tokens", 0), ("max_flops", float("inf"))):
        with pytest.raises(ConfigError, match=rf"{key} must be a (positive|finite) number"):
            TrainConfig.from_dict(TrainConfig().to_dict() | {key: value})


@pytest.mark.parametrize("dtype", [None, auto.torch.bfloat16])
def test_the_machine_is_timed_in_the_dtype_the_run_trains_in(monkeypatch, dtype):
    seen = []
    real = auto.Griffon

    def model(cfg):
        m = real(cfg)
        m.register_forward_hook(lambda *_: seen.append(auto.torch.is_autocast_enabled("cpu")))
        return m

    monkeypatch.setattr(auto, "Griffon", model)
    auto.measure_machine(auto.torch.device("cpu"), widths=(32, 48), steps=1, dtype=dtype)
    assert seen and all(s == (dtype is not None) for s in seen)


def test_a_replanned_run_fills_its_time_and_saves_the_plan(tmp_path, capsys):
    """A token budget planned for 40 steps and a 6-second time budget: once the pace since warmup
    is measured (here at half the planned steps), the run re-plans its tokens, trains on for about
    the rest of the time, and saves the new budget in config.json with where it re-planned; the
    steps before that keep the first plan's learning rates, so a resume replays them."""

    run = tmp_path / "run"
    sets = ["model=griffin-tiny", "data.seq_len=32", "data.batch_size=2", "max_tokens=2560", "max_minutes=0.1",
            "replan_tokens=true", "optim.warmup_steps=10", "eval_every=100000", "save_every=100000",
            "final_eval_batches=2", "log_every=1"]  # fmt: skip
    t0 = auto.time.perf_counter()
    assert main(["train", "--out", str(run), *(f"--set={s}" for s in sets)]) == 0
    took = auto.time.perf_counter() - t0
    saved = json.loads((run / "config.json").read_text())
    steps = saved["max_tokens"] // 64
    assert saved["replan_tokens"] is False and steps > 40 * 3, saved["max_tokens"]
    assert took > 0.6 * 6, took  # it used its time (a 40-step run takes about a second)
    step, before = saved["replanned_at"]
    assert before == 40 and 20 <= step < steps
    logged = {r["step"]: r["lr"] for r in read_records(run / "log.jsonl") if r.get("kind") == "train"}
    cfg = TrainConfig.load(run / "config.json")
    # the step before the re-plan ran on the first plan's schedule (a record is logged after its step)
    assert logged[step] == pytest.approx(lr_at(step - 1, 40, cfg.optim), rel=1e-6)
    assert lr_at(step - 1, 40, cfg.optim) != pytest.approx(lr_at(step - 1, steps, cfg.optim), rel=1e-6)
    capsys.readouterr()
