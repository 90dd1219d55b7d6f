"""The run directory (griffon.run.Run) and the run's data (griffon.data.training_data.TrainingData)."""

import ast
import json
from pathlib import Path

import pytest

from griffon.config import ConfigError
from griffon.data.corpus import default_corpus
from griffon.data.prepare import prepare
from griffon.data.sources import DataError
from griffon.data.tokenizers import ByteTokenizer
from griffon.data.training_data import TrainingData
from griffon.run import CheckpointError, Run


def _checkpoints(run: Run, *steps: int) -> None:
    for step in steps:
        run.checkpoint(step).mkdir(parents=True)


def test_checkpoints_are_griffons_own_in_step_order(tmp_path):
    run = Run(tmp_path)
    assert run.checkpoints() == [] and run.newest_checkpoint() is None and run.resume_point(None) is None
    _checkpoints(run, 10, 2, 100)
    (run.checkpoints_dir / "step_000003_copy").mkdir()
    (run.checkpoints_dir / "step_000004").write_text("a file, not a checkpoint")
    assert [p.name for p in run.checkpoints()] == ["step_000002", "step_000010", "step_000100"]
    assert run.newest_checkpoint() == run.checkpoint(100) == run.resume_point(None)
    assert run.resume_point("step_000010") == run.checkpoint(10)
    with pytest.raises(CheckpointError, match=r"has no checkpoint 'step_000003_copy' \(it has: step_000002, "):
        run.resume_point("step_000003_copy")
    assert Run.of_checkpoint(run.checkpoint(10)).root == run.root
    assert Run.of_checkpoint(tmp_path / "elsewhere" / "step_000010") is None


def test_resume_loads_the_chosen_checkpoint_and_sets_newer_ones_aside(tmp_path, capsys):
    run = Run(tmp_path)
    assert run.resume(None, lambda p: pytest.fail("nothing to load")) is None
    assert "has no checkpoint yet: starting it from step 0" in capsys.readouterr().err
    _checkpoints(run, 1, 2, 3)
    (run.checkpoints_dir / "discarded_step_000003").mkdir()  # from an earlier resume: kept too
    assert run.resume("step_000001", lambda p: p.name) == "step_000001"
    names = sorted(p.name for p in run.checkpoints_dir.iterdir())
    assert names == ["discarded_step_000002", "discarded_step_000003", "discarded_step_000003.1", "step_000001"]


def test_a_newest_checkpoint_that_does_not_load_names_one_that_does(tmp_path):
    run = Run(tmp_path)
    _checkpoints(run, 1, 2, 3)

    def load(path: Path) -> str:
        if path.name != "step_000001":
            raise CheckpointError(f"{path.name} is truncated")
        return path.name

    with pytest.raises(CheckpointError, match="step_000003 is truncated; checkpoint step_000001 loads: resume "
                                              rf"from it with --resume {tmp_path} --checkpoint step_000001"):  # fmt: skip
        run.resume(None, load)
    assert len(run.checkpoints()) == 3  # nothing set aside after a failure


def test_a_run_starts_once_and_resumes_only_where_one_is(tmp_path):
    run = Run(tmp_path / "r")
    with pytest.raises(ConfigError, match="holds no run"):
        run.check_resumable()
    run.check_new()
    run.write_config("{}")
    assert run.exists()
    run.check_resumable()
    with pytest.raises(ConfigError, match="already holds a run; continue it with --resume"):
        run.check_new()
    (run.checkpoints_dir / ".tmp_step_000002_x").mkdir(parents=True)  # an interrupted checkpoint write
    assert [p.name for p in run.clean()] == [".tmp_step_000002_x"]


def test_training_data_is_classified_once(tmp_path):
    assert TrainingData.resolve(None) == TrainingData(corpora=(default_corpus(),))
    corpus = tmp_path / "c.txt"
    corpus.write_text("to be or not to be\n" * 50)
    assert TrainingData.resolve(corpus) == TrainingData(corpora=(corpus,))
    prepared = tmp_path / "prepared"
    prepare([corpus], ByteTokenizer(), prepared, val_fraction=0.0, progress=False)
    data = TrainingData.resolve(str(prepared))
    assert data.prepared == prepared and data.directory(tmp_path / "own") == prepared
    assert data.training_split() == (1.0, 19 * 50)
    with pytest.raises(DataError, match="data.path .*missing not found"):
        TrainingData.resolve(tmp_path / "missing")
    with pytest.raises(ConfigError, match="the data's tokenizer has 256 tokens but model.vocab_size is 100"):
        data.check("bytes", vocab_size=100, verify_shards=True)
    with pytest.raises(ConfigError, match="has 512 tokens but model.vocab_size is 256; set model.vocab_size=512"):
        TrainingData.resolve(corpus).check("bpe-512", vocab_size=256, verify_shards=True)


def test_a_raw_corpus_is_prepared_once_with_its_tokenizer(tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(20)))
    data = TrainingData.resolve(corpus)
    own = tmp_path / "run" / "data"
    assert data.prepare(own, "bpe-300", 0.1, verify_shards=True) == own == data.directory(own)
    assert data.prepare(own, "bpe-300", 0.1, verify_shards=True) == own  # found, checked, kept
    with pytest.raises(DataError, match="was prepared with another tokenizer than data.tokenizer"):
        data.prepare(own, "bytes", 0.1, verify_shards=True)
    (own / "train.bin").write_bytes(b"\0\0" + (own / "train.bin").read_bytes()[2:])
    with pytest.raises(DataError, match="train.bin does not match meta.json"):
        data.prepare(own, "bpe-300", 0.1, verify_shards=True)


def test_the_run_layout_and_the_data_classification_have_one_owner():
    """No module but griffon.run spells a run directory's names, and only the typed data source
    asks whether a path is prepared."""
    import griffon

    root = Path(griffon.__file__).parent
    layout = {"checkpoints", "log.jsonl", "log.csv", "loss.png", "auto.json", ".lock", "tensorboard"}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        tree = ast.parse(path.read_text())
        if rel != "run.py":
            literals = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and n.value in layout}
            assert not literals, (rel, literals)
        if rel not in ("data/prepare.py", "data/training_data.py"):
            names = {getattr(n, "id", None) or getattr(n, "attr", None) for n in ast.walk(tree)}
            assert "is_prepared" not in names, rel
