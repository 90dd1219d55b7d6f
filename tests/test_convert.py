"""`griffon convert` / `export-hf` on files: logits equal the source model's; bad input stops cleanly."""

import json

import pytest
import torch
from safetensors.torch import save_file

from griffon import from_pretrained
from griffon.cli import main
from griffon.config import ModelConfig

from oracles import deepmind_fields, deepmind_pair, hf_pair

TOL = 1e-4
DM_CFG = ModelConfig(
    vocab_size=97, width=64, num_layers=4, num_heads=4, lru_width=96, mlp_width=160, attention_window=8
)
HF_CFG = DM_CFG.replace(num_kv_heads=2, window_semantics="hf")


def _tokens():
    return torch.randint(0, 97, (2, 21))


@pytest.fixture
def deepmind_files(tmp_path):
    ref, _ = deepmind_pair(DM_CFG)
    torch.save(ref.state_dict(), tmp_path / "dm.pt")
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, tmp_path / "dm.safetensors")
    (tmp_path / "dm.json").write_text(json.dumps(deepmind_fields(DM_CFG)))
    return ref, tmp_path


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_deepmind_state_dict_converts_to_equal_logits(deepmind_files, fmt):
    ref, tmp = deepmind_files
    assert main(["convert", str(tmp / f"dm.{fmt}"), str(tmp / "out"), "--config", str(tmp / "dm.json")]) == 0
    ours = from_pretrained(tmp / "out").eval()
    tokens = _tokens()
    seg = torch.arange(21).expand(2, 21)
    with torch.no_grad():
        assert (ours(tokens)[0] - ref(tokens, seg, return_cache=False)[0]).abs().max() <= TOL
    assert ours.config.extra["converted_from"] == f"deepmind:dm.{fmt}"


def test_hf_directory_converts_and_exports_back(tmp_path):
    transformers = pytest.importorskip("transformers")
    ref, _ = hf_pair(HF_CFG)
    ref.save_pretrained(tmp_path / "hf")
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "ours")]) == 0
    ours = from_pretrained(tmp_path / "ours").eval()
    tokens = _tokens()
    with torch.no_grad():
        want = ref(input_ids=tokens, use_cache=False).logits
        assert (ours(tokens)[0] - want).abs().max() <= TOL
    assert main(["export-hf", str(tmp_path / "ours"), str(tmp_path / "back")]) == 0
    back = transformers.RecurrentGemmaForCausalLM.from_pretrained(tmp_path / "back", attn_implementation="eager").eval()
    with torch.no_grad():
        assert (back(input_ids=tokens, use_cache=False).logits - want).abs().max() <= TOL


def test_deepmind_window_exports_to_hf_window_plus_one(deepmind_files, tmp_path):
    transformers = pytest.importorskip("transformers")
    ref, tmp = deepmind_files
    main(["convert", str(tmp / "dm.pt"), str(tmp / "ours"), "--config", str(tmp / "dm.json")])
    assert main(["export-hf", str(tmp / "ours"), str(tmp / "hf")]) == 0
    assert json.loads((tmp / "hf" / "config.json").read_text())["attention_window_size"] == DM_CFG.attention_window + 1
    hf = transformers.RecurrentGemmaForCausalLM.from_pretrained(tmp / "hf", attn_implementation="eager").eval()
    tokens = _tokens()
    seg = torch.arange(21).expand(2, 21)
    with torch.no_grad():
        want = ref(tokens, seg, return_cache=False)[0]
        assert (hf(input_ids=tokens, use_cache=False).logits - want).abs().max() <= TOL


def _fails(argv, capsys, message):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err, err


def test_missing_tensor_is_named_and_nothing_written(deepmind_files, capsys):
    ref, tmp = deepmind_files
    state = ref.state_dict()
    del state["blocks.1.recurrent_block.rg_lru.a_param"]
    torch.save(state, tmp / "broken.pt")
    _fails(["convert", str(tmp / "broken.pt"), str(tmp / "out"), "--config", str(tmp / "dm.json")], capsys,
           "lacks tensor 'blocks.1.recurrent_block.rg_lru.a_param'")  # fmt: skip
    assert not (tmp / "out").exists()
    assert [p.name for p in tmp.iterdir() if p.name.startswith(".")] == []


def test_shape_mismatch_is_named(deepmind_files, capsys):
    _, tmp = deepmind_files
    fields = deepmind_fields(DM_CFG) | {"mlp_expanded_width": 128}
    (tmp / "wrong.json").write_text(json.dumps(fields))
    _fails(["convert", str(tmp / "dm.pt"), str(tmp / "out"), "--config", str(tmp / "wrong.json")], capsys,
           "tensor 'blocks.0.mlp.gate.weight' has shape (160, 64), the config expects (128, 64)")  # fmt: skip


def test_preset_that_does_not_match_the_weights(deepmind_files, capsys):
    _, tmp = deepmind_files
    _fails(["convert", str(tmp / "dm.pt"), str(tmp / "out"), "--preset", "recurrentgemma-2b"], capsys,
           "tensor 'embedder.input_embedding' has width 64, but preset recurrentgemma-2b has width 2560")  # fmt: skip


def test_other_bad_inputs(deepmind_files, capsys, tmp_path):
    _, tmp = deepmind_files
    _fails(["convert", str(tmp / "nope.pt"), str(tmp / "out")], capsys, "source not found")
    (tmp / "weights.npz").write_bytes(b"x")
    _fails(["convert", str(tmp / "weights.npz"), str(tmp / "out"), "--config", str(tmp / "dm.json")], capsys,
           "expected a .pt or .safetensors")  # fmt: skip
    _fails(["convert", str(tmp / "dm.pt"), str(tmp / "out")], capsys, "needs exactly one of --config FILE or --preset")
    (tmp / "garbage.pt").write_bytes(b"not a pickle")
    _fails(["convert", str(tmp / "garbage.pt"), str(tmp / "out"), "--config", str(tmp / "dm.json")], capsys,
           "cannot read")  # fmt: skip
    (tmp / "full").mkdir()
    (tmp / "full" / "keep.txt").write_text("precious")
    _fails(["convert", str(tmp / "dm.pt"), str(tmp / "full"), "--config", str(tmp / "dm.json")], capsys,
           "exists and is not empty")  # fmt: skip
    assert (tmp / "full" / "keep.txt").read_text() == "precious"
    (tmp / "empty_hf").mkdir()
    (tmp / "empty_hf" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    _fails(
        ["convert", str(tmp / "empty_hf"), str(tmp / "out")], capsys, "model_type 'gpt2', expected 'recurrent_gemma'"
    )
    (tmp / "empty_hf" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    _fails(["convert", str(tmp / "empty_hf"), str(tmp / "out")], capsys, "lacks the integer 'vocab_size'")
    (tmp / "fields.json").write_text(json.dumps(deepmind_fields(DM_CFG) | {"widht": 3}))
    _fails(["convert", str(tmp / "dm.pt"), str(tmp / "out"), "--config", str(tmp / "fields.json")], capsys,
           "unknown DeepMind GriffinConfig field 'widht'")  # fmt: skip


def test_info_json(capsys):
    assert main(["info", "recurrentgemma-2b", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["params"] == 2_682_862_080
    assert info["params_non_embedding"] == 2_027_502_080


def test_export_hf_refuses_what_hf_cannot_express(tmp_path, capsys):
    from griffon.checkpoint import save_pretrained
    from griffon.config import LinearStructure
    from griffon.model import Griffon
    from griffon.presets import get_preset

    cfg = get_preset("griffin-tiny", ffn_structure=LinearStructure(kind="lowrank", rank=16))
    save_pretrained(Griffon(cfg), tmp_path / "ours")
    _fails(["export-hf", str(tmp_path / "ours"), str(tmp_path / "hf")], capsys, "a structured FFN (lowrank")
    assert not (tmp_path / "hf").exists()


def test_export_hf_onto_a_link_writes_into_its_target(tmp_path, capsys):
    from griffon import Griffon, get_preset, save_pretrained

    save_pretrained(Griffon(get_preset("griffin-tiny")), tmp_path / "ours")
    (tmp_path / "target").mkdir()
    (tmp_path / "out").symlink_to(tmp_path / "target", target_is_directory=True)
    assert main(["export-hf", str(tmp_path / "ours"), str(tmp_path / "out")]) == 0
    assert (tmp_path / "out").is_symlink() and (tmp_path / "target" / "config.json").is_file()
    (tmp_path / "file").write_text("x")
    (tmp_path / "to_file").symlink_to(tmp_path / "file")
    _fails(["export-hf", str(tmp_path / "ours"), str(tmp_path / "to_file")], capsys, "which is not a directory")
    _fails(["export-hf", str(tmp_path / "ours"), str(tmp_path / "out")], capsys, "is not an empty directory")
