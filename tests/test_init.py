"""``griffon train --init SRC``: a new run whose step-0 weights, config and tokenizer are SRC's."""

import json

import pytest
import torch
from safetensors.torch import save_file

from griffon import from_pretrained
from griffon.checkpoint import resolve
from griffon.cli import main
from griffon.config import ModelConfig
from griffon.data.loader import PackedLoader, TokenSplit
from griffon.model import Griffon
from griffon.train.config import TrainConfig, apply_overrides
from griffon.train.init import init_config, load_init_weights, open_init
from griffon.train.losses import next_token_loss

from oracles import deepmind_fields, deepmind_pair, hf_pair

TINY = [
    "data.seq_len=32", "data.batch_size=4", "dtype=fp32", "max_minutes=null", "max_steps=3",
    "eval_batches=1", "final_eval_batches=1", "eval_every=100", "log_every=1", "optim.warmup_steps=1",
]  # fmt: skip
# vocab 256: the byte tokenizer reads with it
RG_CFG = ModelConfig(vocab_size=256, width=32, num_layers=3, num_heads=2, lru_width=48, mlp_width=64,
                     attention_window=8)  # fmt: skip


def _train(out, *extra):
    argv = ["train", "--out", str(out), *[f"--set={s}" for s in TINY], *extra]
    assert main(argv) == 0


def _step_one_loss(run) -> float:
    return next(
        r["loss"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if r["kind"] == "train"
    )


def _first_batch_loss(model: Griffon, run) -> float:
    """The loss ``model`` gives the first batch ``run`` trained on (the same loader, seed 0)."""
    loader = PackedLoader(TokenSplit.open(run / "data", "train"), 32, 4, 0, 0, 1)
    tokens, seg = next(loader)
    with torch.no_grad():
        logits, _ = model(tokens[:, :-1], seg[:, :-1])
    return next_token_loss(logits, tokens[:, 1:], None)[0].item()


@pytest.mark.parametrize("preset", ["griffin-tiny", "hawk-tiny", "mqa-tiny"])
def test_a_run_starts_from_the_weights_config_and_tokenizer_of_another(tmp_path, preset, capsys):
    _train(tmp_path / "base", f"--set=model={preset}")
    _train(tmp_path / "tuned", "--init", str(tmp_path / "base"), "--set=optim.lr=1e-3")
    base = from_pretrained(tmp_path / "base" / "checkpoints" / "step_000003").eval()
    cfg = TrainConfig.load(tmp_path / "tuned" / "config.json")
    assert cfg.model == base.config and cfg.init == str(tmp_path / "base" / "checkpoints" / "step_000003")
    assert cfg.data.tokenizer == "bytes" and (tmp_path / "tuned" / "tokenizer.json").is_file()
    # step 1 of the new run is computed with the base's weights, not random ones
    assert _step_one_loss(tmp_path / "tuned") == pytest.approx(_first_batch_loss(base, tmp_path / "tuned"), rel=1e-5)


def test_structured_ffn_models_start_from_their_checkpoint(tmp_path):
    _train(tmp_path / "base", "--set=model=griffin-tiny", "--set=model.ffn_structure.kind=lowrank",
           "--set=model.ffn_structure.rank=8")  # fmt: skip
    source = open_init(tmp_path / "base")
    cfg = TrainConfig.from_dict(init_config(apply_overrides(TrainConfig().to_dict(), TINY), source, []))
    model = Griffon(cfg.model)
    load_init_weights(model, cfg.init)
    base = from_pretrained(source.path)
    tokens = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        assert torch.equal(model.eval()(tokens)[0], base.eval()(tokens)[0])


def test_an_hf_recurrentgemma_directory_continues_from_the_same_logits(tmp_path):
    pytest.importorskip("transformers")
    ref, _ = hf_pair(RG_CFG.replace(window_semantics="hf"))
    ref.save_pretrained(tmp_path / "hf")
    source = open_init(tmp_path / "hf")
    assert source.kind == "hf" and source.tokenizer is None
    with pytest.raises(ValueError, match="has no tokenizer: name the one its model reads"):
        init_config(TrainConfig().to_dict(), source, [])
    d = init_config(apply_overrides(TrainConfig().to_dict(), TINY), source, ["data.tokenizer=bytes"])
    model = Griffon(TrainConfig.from_dict(d).model)
    load_init_weights(model, tmp_path / "hf")
    tokens = torch.randint(0, 256, (2, 21))
    with torch.no_grad():
        want = ref(input_ids=tokens, use_cache=False).logits
        assert (model.eval()(tokens)[0] - want).abs().max() <= 1e-4


def test_a_converted_deepmind_checkpoint_continues_from_the_same_logits(tmp_path):
    ref, _ = deepmind_pair(RG_CFG)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, tmp_path / "dm.safetensors")
    (tmp_path / "dm.json").write_text(json.dumps(deepmind_fields(RG_CFG)))
    assert main(["convert", str(tmp_path / "dm.safetensors"), str(tmp_path / "ours"), "--config",
                 str(tmp_path / "dm.json")]) == 0  # fmt: skip
    _train(tmp_path / "tuned", "--init", str(tmp_path / "ours"), "--set=data.tokenizer=bytes")
    converted = from_pretrained(tmp_path / "ours").eval()
    tokens = torch.randint(0, 256, (2, 21))
    seg = torch.arange(21).expand(2, 21)
    with torch.no_grad():
        assert (converted(tokens)[0] - ref(tokens, seg, return_cache=False)[0]).abs().max() <= 1e-4
    assert _step_one_loss(tmp_path / "tuned") == pytest.approx(
        _first_batch_loss(converted, tmp_path / "tuned"), rel=1e-5
    )


def test_what_init_refuses(tmp_path, capsys):
    _train(tmp_path / "base", "--set=model=griffin-tiny")

    def fails(*argv, message):
        assert main(["train", "--out", str(tmp_path / "new"), *argv]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "new").exists()

    base = str(tmp_path / "base")
    fails("--init", base, "--set=model.width=48", message="changes the model's shapes, which --init keeps")
    fails("--init", base, "--set=model=hawk-tiny", message="--init takes the model from SRC")
    fails("--init", base, "--set=data.tokenizer=bpe-300", message="reads with the tokenizer bytes")
    fails("--init", str(tmp_path / "nowhere"), message="not found")
    fails("--init", str(tmp_path), message="neither a checkpoint")
    # what keeps every shape may change
    _train(tmp_path / "capped", "--init", base, "--set=model.logit_soft_cap=20.0")
    assert TrainConfig.load(tmp_path / "capped" / "config.json").model.logit_soft_cap == 20.0
    assert main(["train", "--resume", str(tmp_path / "capped"), "--init", base]) == 2
    assert "drop CONFIG, --out and --init" in capsys.readouterr().err


def test_a_lora_run_trains_and_saves_its_adapters_only_and_reads_back_merged(tmp_path, capsys):
    pytest.importorskip("peft")
    _train(tmp_path / "base", "--set=model=griffin-tiny")
    _train(tmp_path / "lora", "--init", str(tmp_path / "base"), "--set=lora.rank=4", "--set=optim.lr=1e-2",
           "--set=save_every=3")  # fmt: skip
    ckpt = tmp_path / "lora" / "checkpoints" / "step_000003"
    assert not (ckpt / "model.safetensors").exists() and (ckpt / "adapter.safetensors").is_file()
    from safetensors import safe_open

    with safe_open(str(ckpt / "adapter.safetensors"), "pt") as f:
        names = list(f.keys())
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    # 3 Linears per recurrent block, 4 per attention block, 3 per FFN; an A and a B each
    assert len(names) == 2 * (2 * 3 + 4 + 3 * 3)
    base = from_pretrained(resolve(tmp_path / "base")[0]).eval()
    merged = from_pretrained(resolve(tmp_path / "lora")[0]).eval()  # adapters merged into the base
    assert merged.config == base.config
    assert all(type(m).__module__.startswith(("torch", "griffon")) for m in merged.modules())
    for (name, b), (_, m) in zip(base.state_dict().items(), merged.state_dict().items(), strict=True):
        touched = any(name.endswith(f".{t}.weight") for t in ("q", "k", "v", "o", "linear_x", "linear_y",
                                                                  "linear_out", "gate", "up", "down"))  # fmt: skip
        assert torch.equal(b, m) != touched, name  # only the adapted linears moved
    # every command that reads a checkpoint reads it: sample, and export-hf (transformers loads that)
    assert main(["sample", str(tmp_path / "lora"), "--prompt", "KING", "--max-new-tokens", "4", "--seed", "0"]) == 0
    assert main(["export-hf", str(tmp_path / "lora"), str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    transformers = pytest.importorskip("transformers")
    hf = transformers.RecurrentGemmaForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    tokens = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        assert (hf(input_ids=tokens, use_cache=False).logits - merged(tokens)[0]).abs().max() <= 1e-4


def test_merged_and_unmerged_lora_models_agree(tmp_path):
    pytest.importorskip("peft")
    from griffon.checkpoint.adapters import adapter_state_dict, apply_lora, merge_lora
    from griffon.presets import get_preset

    torch.manual_seed(0)
    model = Griffon(get_preset("griffin-tiny")).double().eval()
    apply_lora(model, 4, 8.0, 0.0, ("q", "v", "linear_x", "up"))
    for name, p in model.named_parameters():
        assert p.requires_grad == (".lora_" in name), name
        if ".lora_B." in name:
            p.data.normal_()  # B starts at zero: give the adapters something to add
    tokens = torch.randint(0, 256, (2, 30))
    with torch.no_grad():
        unmerged = model(tokens)[0]
        assert len(adapter_state_dict(model)) == 2 * (2 + 2 + 3)  # q and v in 1 block; linear_x in 2; up in 3
        merged = merge_lora(model)(tokens)[0]
    assert (merged - unmerged).abs().max() <= 1e-10


def test_a_killed_lora_run_resumes_its_adapters(tmp_path):
    pytest.importorskip("peft")
    _train(tmp_path / "base", "--set=model=hawk-tiny")
    lora = ["--init", str(tmp_path / "base"), "--set=lora.rank=2", "--set=max_steps=4", "--set=save_every=2"]
    _train(tmp_path / "whole", *lora)
    _train(tmp_path / "cut", *lora[:-2], "--set=max_steps=2", "--set=save_every=2")
    assert main(["train", "--resume", str(tmp_path / "cut"), "--set=max_steps=4"]) == 0
    whole = [json.loads(x) for x in (tmp_path / "whole" / "log.jsonl").read_text().splitlines()]
    cut = [json.loads(x) for x in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in whole if r["kind"] == "train"][2:] == [r["loss"] for r in cut if r["kind"] == "train"][
        2:
    ]


def test_what_lora_refuses(tmp_path, capsys):
    _train(tmp_path / "base", "--set=model=griffin-tiny")
    argv = ["train", "--out", str(tmp_path / "new"), "--init", str(tmp_path / "base")]
    assert main([*argv, "--set=lora.rank=4", '--set=lora.targets=["q", "nope"]']) == 2
    assert "lora.targets nope match no linear layer of this model" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "new"), "--set=lora.rank=4"]) == 2
    assert "lora.rank adapts a trained model: start the run with --init SRC" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_a_lora_run_reads_its_base_from_anywhere_and_refuses_a_changed_one(tmp_path, monkeypatch, capsys):
    """A relative --init is stored by its absolute path (and as given), so the LoRA run is read from
    any directory; a base whose weights changed since is refused by name; a LoRA run is itself a
    starting point (the SFT -> DPO chain), read merged."""
    pytest.importorskip("peft")
    from griffon.checkpoint import save_pretrained

    monkeypatch.chdir(tmp_path)
    _train("base", "--set=model=hawk-tiny")
    _train("lora", "--init", "base", "--set=lora.rank=2")
    cfg = TrainConfig.load(tmp_path / "lora" / "config.json")
    assert cfg.init == str((tmp_path / "base" / "checkpoints" / "step_000003").resolve()) and cfg.init_given == "base"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["sample", str(tmp_path / "lora"), "--prompt", "A", "--max-new-tokens", "2", "--seed", "0"]) == 0
    _train(tmp_path / "chained", "--init", str(tmp_path / "lora"))  # a LoRA run as SRC: read merged
    merged = from_pretrained(resolve(tmp_path / "lora")[0]).eval()
    assert _step_one_loss(tmp_path / "chained") == pytest.approx(
        _first_batch_loss(merged, tmp_path / "chained"), rel=1e-5
    )
    capsys.readouterr()

    base_ckpt = tmp_path / "base" / "checkpoints" / "step_000003"
    changed = from_pretrained(base_ckpt)
    with torch.no_grad():
        changed.embed.weight.add_(0.01)
    save_pretrained(changed, base_ckpt)  # the base's checkpoint rewritten (a user's edit, a re-export)
    assert main(["sample", str(tmp_path / "lora"), "--prompt", "A", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert f"the base model {base_ckpt} has changed since the adapters were trained on it" in err


def test_a_refused_init_leaves_nothing_and_names_what_is_wrong(tmp_path, capsys):
    from griffon.checkpoint import save_pretrained

    _train(tmp_path / "base", "--set=model=griffin-tiny")
    ckpt = tmp_path / "base" / "checkpoints" / "step_000003"
    bad = from_pretrained(ckpt)
    with torch.no_grad():
        bad.embed.weight[0, 0] = float("nan")
    save_pretrained(bad, tmp_path / "nan")
    (tmp_path / "nan" / "tokenizer.json").write_text((tmp_path / "base" / "tokenizer.json").read_text())
    assert (
        main(["train", "--out", str(tmp_path / "new"), "--init", str(tmp_path / "nan"), *[f"--set={s}" for s in TINY]])
        == 2
    )
    assert "contains NaN or Inf" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()  # the retry is not refused as "already holds a run"
    weights = tmp_path / "nan" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    assert main(["train", "--out", str(tmp_path / "new"), "--init", str(tmp_path / "nan")]) == 2
    err = capsys.readouterr().err
    assert f"--init {tmp_path / 'nan'}" in err and "--set" not in err and "changes the model's shapes" not in err
    assert not (tmp_path / "new").exists()
