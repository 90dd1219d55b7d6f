"""Llama-family checkpoints as griffon's transformer: logits equal transformers' LlamaForCausalLM and
MistralForCausalLM (random weights, built offline) in a full forward, a chunked prefill and decoding;
the HF directory, `griffon convert`, `export-hf` (back to Llama's layout) and every reader work on
them; what griffon cannot represent is refused in one line."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from griffon import from_pretrained  # noqa: E402
from griffon.checkpoint import open_source  # noqa: E402
from griffon.checkpoint.llama import LlamaError, config_from_llama  # noqa: E402
from griffon.cli import main  # noqa: E402
from griffon.data.tokenizers import ByteTokenizer  # noqa: E402

TOL = 1e-4
# Sizes that are multiples of nothing useful: width 44, head_dim 14 (4 x 14 != 44), GQA 4 query heads on 2.
SIZES = dict(vocab_size=301, hidden_size=44, intermediate_size=71, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, head_dim=14, rms_norm_eps=1e-5, max_position_embeddings=128)  # fmt: skip


def _teacher(tie: bool, mistral_window: int | None = None, seed: int = 0):
    torch.manual_seed(seed)
    if mistral_window is None:
        cfg = transformers.LlamaConfig(**SIZES, tie_word_embeddings=tie, rope_theta=5000.0)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.MistralConfig(**SIZES, tie_word_embeddings=tie, sliding_window=mistral_window)
        model = transformers.MistralForCausalLM(cfg)
    with torch.no_grad():  # norms away from 1, so that their convention matters
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model.double().eval()


def _save(model, path):
    model.save_pretrained(path, safe_serialization=True)
    ByteTokenizer().save_hf(path)
    return path


def _hf_logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=tokens).logits


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("window", [None, 5])
def test_logits_equal_transformers_in_a_forward_a_chunked_prefill_and_decoding(tmp_path, tie, window):
    hf = _teacher(tie, window)
    ours = from_pretrained(_save(hf, tmp_path / "hf")).double().eval()
    assert ours.config.tie_embeddings == tie and (ours.head is None) == tie
    torch.manual_seed(1)
    tokens = torch.randint(0, 301, (2, 23))
    want = _hf_logits(hf, tokens)
    with torch.no_grad():
        assert (ours(tokens)[0] - want).abs().max() <= TOL
        logits, cache = ours(tokens[:, :7], return_cache=True)
        got = [logits]
        logits, cache = ours(tokens[:, 7:16], cache=cache)  # a second chunk, past the window
        got.append(logits)
        for t in range(16, 23):
            logits, cache = ours(tokens[:, t : t + 1], cache=cache)
            got.append(logits)
    assert (torch.cat(got, dim=1) - want).abs().max() <= TOL


def test_the_directory_converts_exports_and_reads_back_bitwise(tmp_path):
    hf = _teacher(tie=False)
    src = _save(hf, tmp_path / "hf")
    assert main(["convert", str(src), str(tmp_path / "ours")]) == 0
    converted = open_source(tmp_path / "ours").state_dict()
    direct = open_source(src).state_dict()
    assert converted.keys() == direct.keys() and all(torch.equal(converted[k], direct[k]) for k in direct)
    assert main(["export-hf", str(src), str(tmp_path / "back")]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").double().eval()
    assert type(back).__name__ == "LlamaForCausalLM"
    tokens = torch.randint(0, 301, (1, 12))
    assert torch.equal(_hf_logits(back, tokens), _hf_logits(hf, tokens))


def test_readers_take_a_llama_directory_and_count_its_parameters_exactly(tmp_path, capsys):
    hf = _teacher(tie=True)
    src = _save(hf, tmp_path / "hf")
    assert main(["sample", str(src), "--prompt", "ab", "--max-new-tokens", "3", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("ab")
    assert main(["info", str(src)]) == 0
    params = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("params "))
    assert params.split()[-1] == f"{sum(p.numel() for p in hf.parameters()):,}"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "gpt2"}, "expected one of ('llama', 'mistral')"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
        ({"attention_bias": True}, "attention_bias=true is not supported"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rotary scaling 'llama3' is not supported"),
        ({"hidden_size": None}, "lacks the integer 'hidden_size'"),
    ],
)
def test_what_griffon_cannot_represent_is_refused_in_one_line(change, message):
    hf = {"model_type": "llama", **SIZES} | change
    with pytest.raises(LlamaError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config_from_llama(hf)


def test_a_checkpoint_whose_tensors_do_not_fit_names_the_tensor(tmp_path, capsys):
    src = _save(_teacher(tie=True), tmp_path / "hf")
    hf = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(hf | {"intermediate_size": 72}))
    capsys.readouterr()
    assert main(["convert", str(src), str(tmp_path / "out")]) != 0
    err = capsys.readouterr().err
    assert "mlp.gate.weight" in err and "72" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_run_starts_from_a_llama_directory_and_is_served(tmp_path, capsys):
    """--init reads the model, its config (SwiGLU, an untied head, Llama's norms) and its tokenizer;
    the run is evaluated and served like any other."""
    hf = _teacher(tie=False)
    src = _save(hf, tmp_path / "hf")
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"line {i} of a small corpus, for a few steps"}) + "\n"
                              for i in range(300)))  # fmt: skip
    tiny = ["data.seq_len=16", "data.batch_size=2", "dtype=fp32", "max_minutes=null", "max_steps=2",
            "eval_batches=1", "final_eval_batches=1", "log_every=1", f"data.path={corpus}"]  # fmt: skip
    assert main(["train", "--out", str(tmp_path / "run"), "--init", str(src), *[f"--set={s}" for s in tiny]]) == 0
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())["model"]
    assert cfg["mlp_type"] == "swiglu" and not cfg["tie_embeddings"] and not cfg["norm_unit_offset"]
    assert main(["eval", str(tmp_path / "run"), "--jsonl", str(corpus), "--seq-len", "16"]) == 0
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from griffon.checkpoint import load_for_inference
    from griffon.engine import Engine
    from griffon.serve.server import create_app

    model, tokenizer = load_for_inference(tmp_path / "run", device="cpu")
    with TestClient(create_app(Engine(model, tokenizer), "run")) as client:
        assert client.app.state.server.ready.wait(60)
        r = client.post("/v1/completions", json={"prompt": "line", "max_tokens": 3, "temperature": 0})
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("length", "stop")


def test_a_config_json_that_is_not_a_regular_file_is_refused_without_blocking(tmp_path, capsys):
    import os

    (tmp_path / "hf").mkdir()
    os.mkfifo(tmp_path / "hf" / "config.json")
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "out")]) == 2  # a reader would block on it
    assert "without config.json" in capsys.readouterr().err and not (tmp_path / "out").exists()
    assert main(["sample", str(tmp_path / "hf"), "--prompt", "a"]) == 2
    assert "is neither a checkpoint" in capsys.readouterr().err
