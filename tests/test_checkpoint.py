"""save_pretrained / from_pretrained round trips and their errors."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from griffon import Griffon, from_pretrained, get_preset, save_pretrained
from griffon.checkpoint import CheckpointError


@pytest.fixture
def saved(tmp_path):
    model = Griffon(get_preset("griffin-tiny")).eval()
    save_pretrained(model, tmp_path / "ckpt")
    return model, tmp_path / "ckpt"


def test_round_trip_gives_identical_logits(saved):
    model, path = saved
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    loaded = from_pretrained(path).eval()
    tokens = torch.randint(0, 256, (2, 30))
    with torch.no_grad():
        assert torch.equal(model(tokens)[0], loaded(tokens)[0])
    assert from_pretrained(path, dtype=torch.bfloat16).embed.weight.dtype == torch.bfloat16


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="config.json not found"):
        from_pretrained(tmp_path / "nothing")


def test_truncated_weights(saved):
    _, path = saved
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupted or truncated"):
        from_pretrained(path)


def test_config_from_another_model(saved):
    _, path = saved
    cfg = json.loads((path / "config.json").read_text())
    cfg["mlp_width"] = 128
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"tensor 'blocks.0.mlp.gate.weight' has shape \(192, 64\)"):
        from_pretrained(path)


def test_missing_and_nan_tensors(saved):
    _, path = saved
    state = load_file(path / "model.safetensors")
    del state["final_norm.scale"]
    save_file(state, path / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing tensor 'final_norm.scale'"):
        from_pretrained(path)
    state["final_norm.scale"] = torch.full((64,), float("nan"))
    save_file(state, path / "model.safetensors")
    with pytest.raises(CheckpointError, match="'final_norm.scale' contains NaN"):
        from_pretrained(path)


def test_bad_config_in_checkpoint(saved):
    _, path = saved
    (path / "config.json").write_text(json.dumps({"width": 64, "n_layers": 3}))
    with pytest.raises(CheckpointError, match="did you mean 'num_layers'"):
        from_pretrained(path)


def test_save_overwrites_atomically_and_leaves_no_temp_files(saved, monkeypatch):
    model, path = saved
    save_pretrained(model, path)
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    import griffon.checkpoint.format as checkpoint

    real_save = checkpoint.save_file

    def crash_midway(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[: len(data) // 2])  # half the file is on disk...
        raise KeyboardInterrupt  # ...when the process is stopped

    other = Griffon(get_preset("griffin-tiny"))
    monkeypatch.setattr(checkpoint, "save_file", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        save_pretrained(other, path)
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    loaded = from_pretrained(path)
    assert all(
        torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values(), strict=True)
    )


def test_resolve_finds_the_checkpoint_and_its_tokenizer(tmp_path):
    from griffon import resolve
    from griffon.data.tokenizers import ByteTokenizer

    model = Griffon(get_preset("griffin-tiny"))
    run = tmp_path / "run"
    for step in (2, 10):  # numbered so that text order is step order
        save_pretrained(model, run / "checkpoints" / f"step_{step:06d}")
    ByteTokenizer().save(run)
    ckpt, tok = resolve(run)
    assert ckpt == run / "checkpoints" / "step_000010" and tok.kind == "bytes"
    ckpt, tok = resolve(run / "checkpoints" / "step_000002")
    assert ckpt == run / "checkpoints" / "step_000002" and tok.kind == "bytes"
    save_pretrained(model, tmp_path / "exported")
    assert resolve(tmp_path / "exported") == (tmp_path / "exported", None)
    with pytest.raises(CheckpointError, match="neither a checkpoint"):
        resolve(tmp_path)


def test_the_tokenizer_is_looked_up_only_where_griffon_writes_it(tmp_path):
    """In the checkpoint or, for a run's checkpoint, in its run; never in a directory further up
    (a/tokenizer.json is not a/b/c/ckpt's, nor that of a link in a/); a link to a run's checkpoint
    finds the run's."""
    from griffon import resolve
    from griffon.data.tokenizers import ByteTokenizer

    model = Griffon(get_preset("griffin-tiny"))
    ByteTokenizer().save(tmp_path / "a")
    save_pretrained(model, tmp_path / "a" / "b" / "c" / "ckpt")
    assert resolve(tmp_path / "a" / "b" / "c" / "ckpt")[1] is None
    save_pretrained(model, tmp_path / "elsewhere" / "ckpt")
    (tmp_path / "a" / "link").symlink_to(tmp_path / "elsewhere" / "ckpt", target_is_directory=True)
    assert resolve(tmp_path / "a" / "link")[1] is None
    run = tmp_path / "run"
    save_pretrained(model, run / "checkpoints" / "step_000004")
    ByteTokenizer().save(run)
    (tmp_path / "to_step").symlink_to(run / "checkpoints" / "step_000004", target_is_directory=True)
    assert resolve(tmp_path / "to_step")[1] is not None  # in the run of the link's target


@pytest.mark.parametrize(
    "model, message",
    [(None, "needs \"model\""), ("/etc/passwd", "the name of a .model file beside it"),
     ("../outside.model", "the name of a .model file beside it"), ("..", "beside it")],
)  # fmt: skip
def test_a_sentencepiece_marker_names_a_model_file_beside_it(tmp_path, model, message):
    from griffon.data.tokenizers import TokenizerError, load_tokenizer

    marker = {"griffon_tokenizer": "sentencepiece"} | ({} if model is None else {"model": model})
    (tmp_path / "tokenizer.json").write_text(json.dumps(marker))
    with pytest.raises(TokenizerError, match=message):
        load_tokenizer(tmp_path)


def test_commands_open_a_model_for_inference_one_way():
    """Every reader with a model (sample, serve, eval, the lm-eval model, the benchmarks) opens it
    with load_for_inference: no other module calls from_pretrained, but training's resume, which
    loads its own checkpoints."""
    import ast

    import griffon

    root = Path(griffon.__file__).parent
    allowed = {"checkpoint/source.py", "train/state.py", "checkpoint/llama.py"}  # the last: transformers' GGUF reader
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        calls = [
            node.lineno
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Call)
            and (getattr(node.func, "id", None) or getattr(node.func, "attr", None)) == "from_pretrained"
        ]
        assert rel in allowed or not calls, f"{rel}:{calls} loads a checkpoint another way"


def test_load_for_inference_checks_the_tokenizer_and_falls_back_from_cuda(tmp_path):
    from griffon.checkpoint import load_for_inference
    from griffon.data.tokenizers import ByteTokenizer

    small = get_preset("griffin-tiny").replace(vocab_size=128)
    save_pretrained(Griffon(small), tmp_path / "small")
    ByteTokenizer().save(tmp_path / "small")
    with pytest.raises(CheckpointError, match="the tokenizer has 256 tokens, the model's vocabulary only 128"):
        load_for_inference(tmp_path / "small")
    save_pretrained(Griffon(get_preset("griffin-tiny")), tmp_path / "ok")
    ByteTokenizer().save(tmp_path / "ok")
    model, tok = load_for_inference(tmp_path / "ok", device="cuda" if not torch.cuda.is_available() else "cpu")
    assert not model.training and tok.vocab_size == 256 and model.embed.weight.device.type == "cpu"
