"""Import RecurrentGemma checkpoints (HF and DeepMind formats) and Llama-family ones (HF and GGUF,
:mod:`griffon.checkpoint.llama`), and export to HF format (RecurrentGemma's or Llama's layout).

Name maps are spelled out as tables so that a reader can check them against the references:
DeepMind's PyTorch port (``recurrentgemma.torch``) and HF ``transformers.models.recurrent_gemma``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from griffon.atomic import atomic_directory
from griffon.checkpoint import llama
from griffon.checkpoint.format import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    CheckpointError,
    check_fits,
    read_safetensors,
    save_state_dict,
)
from griffon.config import ConfigError, ModelConfig
from griffon.data.tokenizers import Tokenizer
from griffon.files import CONFIG_BYTES, FileError, read_json
from griffon.model import Griffon
from griffon.presets import get_preset

Tensors = dict[str, torch.Tensor]


class ConversionError(CheckpointError):
    """The source checkpoint cannot be converted; the message names the tensor or field."""


# ----- configs --------------------------------------------------------------------------------
def _pattern_of(block_types: list[str]) -> tuple[tuple[str, ...], int]:
    """Shortest pattern whose cycle gives ``block_types``, and the number of layers."""
    n = len(block_types)
    for p in range(1, n + 1):
        if all(block_types[i] == block_types[i % p] for i in range(n)):
            return tuple(block_types[:p]), n
    raise AssertionError("unreachable")


def config_from_deepmind(fields: dict[str, Any]) -> ModelConfig:
    """A griffon config from DeepMind ``GriffinConfig`` field names (block types as strings)."""
    known = {
        "vocab_size", "width", "mlp_expanded_width", "num_heads", "block_types", "embeddings_scale_by_sqrt_dim",
        "attention_window_size", "logits_soft_cap", "lru_width", "scan_type",
    }  # fmt: skip
    for key in fields:
        if key not in known:
            raise ConversionError(f"unknown DeepMind GriffinConfig field {key!r}; known: {sorted(known)}")
    for key in ("vocab_size", "width", "mlp_expanded_width", "num_heads", "block_types"):
        if key not in fields:
            raise ConversionError(f"DeepMind config lacks required field {key!r}")
    types = [str(getattr(b, "name", b)).split(".")[-1].lower() for b in fields["block_types"]]
    pattern, layers = _pattern_of(types)
    try:
        return ModelConfig(
            vocab_size=fields["vocab_size"], width=fields["width"], num_layers=layers, block_pattern=pattern,
            num_heads=fields["num_heads"], num_kv_heads=1, lru_width=fields.get("lru_width"),
            mlp_width=fields["mlp_expanded_width"], attention_window=fields.get("attention_window_size", 2048),
            window_semantics="deepmind", embed_scale=fields.get("embeddings_scale_by_sqrt_dim", True),
            logit_soft_cap=float(fields.get("logits_soft_cap", 30.0)),
        )  # fmt: skip
    except ConfigError as e:
        raise ConversionError(f"DeepMind config: {e}") from None


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """A griffon config from an HF ``RecurrentGemmaConfig`` dict (``config.json``)."""
    if hf.get("model_type") not in (None, "recurrent_gemma"):
        raise ConversionError(
            f"config.json has model_type {hf.get('model_type')!r}, expected 'recurrent_gemma' or a Llama-family one (llama, mistral)"
        )
    rope = hf.get("rope_parameters") or {}
    layers = hf.get("num_hidden_layers", 26)
    block_types = list(hf.get("block_types", ["recurrent", "recurrent", "attention"]))
    pattern, _ = _pattern_of([block_types[i % len(block_types)] for i in range(layers)])
    width = hf.get("hidden_size", 2560)
    heads = hf.get("num_attention_heads", 10)
    try:
        return ModelConfig(
            vocab_size=hf.get("vocab_size", 256000), width=width, num_layers=layers, block_pattern=pattern,
            num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads, head_dim=width // heads,
            lru_width=hf.get("lru_width") or width, lru_num_blocks=heads, conv_width=hf.get("conv1d_width", 4),
            attention_window=hf.get("attention_window_size", 2048), window_semantics="hf",
            mlp_width=hf.get("intermediate_size", 3 * 2560) // 2, embed_scale=True,
            logit_soft_cap=float(hf.get("logits_soft_cap", 30.0)), norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_fraction=float(rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.5))),
            rope_base=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        )  # fmt: skip
    except ConfigError as e:
        raise ConversionError(f"HF config: {e}") from None


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """The HF ``config.json`` equivalent of ``cfg``; raises if HF cannot express it."""
    problems = []
    if cfg.mlp_type != "geglu" or cfg.norm_type != "rmsnorm" or not cfg.norm_unit_offset:
        problems.append(f"mlp_type={cfg.mlp_type!r}, norm_type={cfg.norm_type!r}, norm_unit_offset="
                        f"{cfg.norm_unit_offset} (HF has the GeGLU MLP and Gemma's RMSNorm)")  # fmt: skip
    if not cfg.tie_embeddings or not cfg.proj_bias:
        problems.append("an untied head or no projection biases (HF ties the head and has the biases)")
    if cfg.ffn_structure.is_structured():
        problems.append(f"a structured FFN ({cfg.ffn_structure.kind}; HF has dense projections only)")
    if cfg.moe.enabled:
        problems.append("a mixture-of-experts FFN (RecurrentGemma's layout has one dense MLP a layer)")
    if not cfg.embed_scale:
        problems.append("embed_scale=False (HF always scales embeddings)")
    if not cfg.logit_soft_cap:
        problems.append("logit_soft_cap=0 (HF always applies its soft cap)")
    if cfg.resolved_head_dim * cfg.num_heads != cfg.width:
        problems.append("head_dim * num_heads != width")
    if cfg.resolved_lru_num_blocks != cfg.num_heads:
        problems.append("lru_num_blocks != num_heads")
    if cfg.attention_window is None:
        problems.append("global attention (attention_window=None)")
    if cfg.qkv_bias:
        problems.append("qkv_bias=True (HF has no query, key or value biases)")
    if problems:
        raise ConversionError("HF RecurrentGemma cannot express this model: " + "; ".join(problems))
    assert cfg.attention_history is not None
    return {
        "architectures": ["RecurrentGemmaForCausalLM"],
        "model_type": "recurrent_gemma",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.width,
        "num_hidden_layers": cfg.num_layers,
        "intermediate_size": 2 * cfg.resolved_mlp_width,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "lru_width": cfg.resolved_lru_width,
        # HF's window counts the query itself: history + 1 keys in all.
        "attention_window_size": cfg.attention_history + 1,
        "conv1d_width": cfg.conv_width,
        "logits_soft_cap": cfg.logit_soft_cap,
        "rms_norm_eps": cfg.norm_eps,
        "block_types": list(cfg.block_pattern),
        "hidden_activation": "gelu_pytorch_tanh",
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": cfg.rope_base,
            "partial_rotary_factor": cfg.rope_fraction,
        },
        "tie_word_embeddings": True,
    }


# ----- weights --------------------------------------------------------------------------------
def hf_transformers_config(cfg: ModelConfig):
    """``cfg`` as a ``transformers.RecurrentGemmaConfig`` (needs ``transformers``)."""
    import transformers

    hf = config_to_hf(cfg)
    return transformers.RecurrentGemmaConfig(
        **{k: v for k, v in hf.items() if k not in ("architectures", "model_type")}
    )


def _take(src: Tensors, name: str, used: set[str]) -> torch.Tensor:
    if name not in src:
        raise ConversionError(f"source checkpoint lacks tensor {name!r}")
    used.add(name)
    return src[name]


def _finish(cfg: ModelConfig, src: Tensors, used: set[str], out: Tensors, ignore: Callable[[str], bool]) -> Tensors:
    extra = sorted(k for k in src if k not in used and not ignore(k))
    if extra:
        raise ConversionError(f"source checkpoint has unexpected tensor {extra[0]!r} (and {len(extra) - 1} more)")
    try:
        check_fits(cfg, out, "converted checkpoint")
    except CheckpointError as e:
        raise ConversionError(str(e)) from None
    return out


def from_deepmind_state_dict(src: Tensors, cfg: ModelConfig) -> Tensors:
    """Map a DeepMind port state dict onto griffon names."""
    used: set[str] = set()
    t = lambda name: _take(src, name, used)  # noqa: E731
    out: Tensors = {"embed.weight": t("embedder.input_embedding"), "final_norm.scale": t("final_norm.scale")}
    for i, kind in enumerate(cfg.block_types):
        s, d = f"blocks.{i}.", f"blocks.{i}."
        out[d + "temporal_norm.scale"] = t(s + "temporal_pre_norm.scale")
        out[d + "channel_norm.scale"] = t(s + "channel_pre_norm.scale")
        if kind == "recurrent":
            r = s + "recurrent_block."
            for lin in ("linear_x", "linear_y", "linear_out"):
                out[d + f"temporal.{lin}.weight"] = t(r + f"{lin}.weight")
                out[d + f"temporal.{lin}.bias"] = t(r + f"{lin}.bias")
            out[d + "temporal.conv.weight"] = t(r + "conv_1d.w")
            out[d + "temporal.conv.bias"] = t(r + "conv_1d.b")
            out[d + "temporal.rglru.a_param"] = t(r + "rg_lru.a_param")
            for gate in ("input_gate", "a_gate"):
                out[d + f"temporal.rglru.{gate}.weight"] = t(r + f"rg_lru.{gate}.w")
                out[d + f"temporal.rglru.{gate}.bias"] = t(r + f"rg_lru.{gate}.b")
        else:
            a = s + "attention_block."
            for ours, theirs in (("q", "proj_q"), ("k", "proj_k"), ("v", "proj_v"), ("o", "proj_final")):
                out[d + f"temporal.{ours}.weight"] = t(a + f"{theirs}.weight")
            out[d + "temporal.o.bias"] = t(a + "proj_final.bias")
        up_w, up_b = t(s + "mlp_block.ffw_up.w"), t(s + "mlp_block.ffw_up.b")  # (2, D, E), (2, 1, 1, E)
        if up_w.dim() != 3 or up_w.shape[0] != 2 or up_b.numel() != 2 * up_w.shape[-1]:
            raise ConversionError(
                f"tensor {s + 'mlp_block.ffw_up.w'!r} / '.b' have shapes {tuple(up_w.shape)} / {tuple(up_b.shape)}, "
                "expected (2, width, mlp_width) and (2, 1, 1, mlp_width)"
            )
        out[d + "mlp.gate.weight"], out[d + "mlp.up.weight"] = up_w[0].T, up_w[1].T
        out[d + "mlp.gate.bias"], out[d + "mlp.up.bias"] = up_b[0].flatten(), up_b[1].flatten()
        out[d + "mlp.down.weight"] = t(s + "mlp_block.ffw_down.weight")
        out[d + "mlp.down.bias"] = t(s + "mlp_block.ffw_down.bias")
    return _finish(cfg, src, used, out, ignore=lambda k: False)


# griffon suffix <-> HF suffix inside a layer, for tensors that map one to one.
_HF_LAYER_NAMES = {
    "temporal_norm.scale": "temporal_pre_norm.weight",
    "channel_norm.scale": "channel_pre_norm.weight",
    **{f"temporal.{n}.{p}": f"temporal_block.{n}.{p}" for n in ("linear_x", "linear_y", "linear_out") for p in ("weight", "bias")},
    "temporal.conv.bias": "temporal_block.conv_1d.bias",
    "temporal.rglru.a_param": "temporal_block.rg_lru.recurrent_param",
    "temporal.rglru.input_gate.weight": "temporal_block.rg_lru.input_gate_weight",
    "temporal.rglru.input_gate.bias": "temporal_block.rg_lru.input_gate_bias",
    "temporal.rglru.a_gate.weight": "temporal_block.rg_lru.recurrent_gate_weight",
    "temporal.rglru.a_gate.bias": "temporal_block.rg_lru.recurrent_gate_bias",
    **{f"temporal.{n}.weight": f"temporal_block.{n}_proj.weight" for n in ("q", "k", "v", "o")},
    "temporal.o.bias": "temporal_block.o_proj.bias",
    **{f"mlp.{n}.{p}": f"mlp_block.{n}_proj.{p}" for n in ("gate", "up", "down") for p in ("weight", "bias")},
}  # fmt: skip


def from_hf_state_dict(src: Tensors, cfg: ModelConfig) -> Tensors:
    """Map an HF ``RecurrentGemmaForCausalLM`` state dict onto griffon names."""
    used: set[str] = set()
    out: Tensors = {
        "embed.weight": _take(src, "model.embed_tokens.weight", used),
        "final_norm.scale": _take(src, "model.final_norm.weight", used),
    }
    with torch.device("meta"):
        names = Griffon(cfg).state_dict().keys()
    for name in names:
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
        if m is None:
            continue
        i, suffix = m.groups()
        prefix = f"model.layers.{i}."
        if suffix == "temporal.conv.weight":
            w = _take(src, prefix + "temporal_block.conv_1d.weight", used)  # (C, 1, K)
            if w.dim() != 3 or w.shape[1] != 1:
                raise ConversionError(
                    f"tensor {prefix + 'temporal_block.conv_1d.weight'!r} has shape {tuple(w.shape)}, expected (C, 1, K)"
                )
            out[name] = w[:, 0, :].T
        else:
            out[name] = _take(src, prefix + _HF_LAYER_NAMES[suffix], used)
    if "lm_head.weight" in src and not torch.equal(src["lm_head.weight"], out["embed.weight"]):
        raise ConversionError("tensor 'lm_head.weight' differs from the embedding; griffon ties them")
    return _finish(cfg, src, used, out, ignore=lambda k: k == "lm_head.weight")


def to_hf_state_dict(state: Tensors) -> Tensors:
    """Map a griffon state dict onto HF names (the inverse of :func:`from_hf_state_dict`)."""
    out: Tensors = {}
    for name, value in state.items():
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
        if name == "embed.weight":
            out["model.embed_tokens.weight"] = value
        elif name == "final_norm.scale":
            out["model.final_norm.weight"] = value
        elif m and m.group(2) == "temporal.conv.weight":
            out[f"model.layers.{m.group(1)}.temporal_block.conv_1d.weight"] = value.T[:, None, :].contiguous()
        elif m and m.group(2) in _HF_LAYER_NAMES:
            out[f"model.layers.{m.group(1)}.{_HF_LAYER_NAMES[m.group(2)]}"] = value
        else:
            raise ConversionError(f"no HF name for tensor {name!r}")
    return out


# ----- files ----------------------------------------------------------------------------------
def _read_hf_dir(path: Path) -> tuple[ModelConfig, Tensors]:
    """An HF directory's config and weights in griffon's names: RecurrentGemma or Llama-family."""
    try:
        hf = read_json(path / CONFIG_NAME, CONFIG_BYTES, "an HF config.json")
    except FileError as e:
        raise ConversionError(str(e)) from None
    if not isinstance(hf, dict):
        raise ConversionError(f"{path / CONFIG_NAME} is not a JSON object")
    cfg = llama.config_from_llama(hf) if llama.is_llama(hf) else config_from_hf(hf)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ConversionError(f"{path} holds no *.safetensors weights")
    state: Tensors = {}
    for f in files:
        state.update(read_safetensors(f))
    return cfg, hf_state_dict(state, cfg)


def hf_state_dict(state: Tensors, cfg: ModelConfig) -> Tensors:
    """An HF directory's weights (RecurrentGemma's or a Llama-family model's, as ``cfg`` says) in
    griffon's names."""
    return llama.from_llama_state_dict(state, cfg) if not llama.llama_problems(cfg) else from_hf_state_dict(state, cfg)


def _read_deepmind(path: Path, config_file: Path | None, preset: str | None) -> tuple[ModelConfig, Tensors]:
    if (config_file is None) == (preset is None):
        raise ConversionError("a DeepMind checkpoint needs exactly one of --config FILE or --preset NAME")
    if path.suffix == ".safetensors":
        state = read_safetensors(path)
    elif path.suffix in (".pt", ".pth", ".bin"):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for bad pickles
            first_line = (str(e).splitlines() or [type(e).__name__])[0][:160]
            raise ConversionError(
                f"cannot read {path} as a tensors-only torch state dict (loaded with weights_only=True): {first_line}"
            ) from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ConversionError(f"{path} does not hold a flat state dict of tensors")
    else:
        raise ConversionError(f"{path}: expected a .pt or .safetensors DeepMind state dict, or an HF directory")
    vocab, width = state["embedder.input_embedding"].shape if "embedder.input_embedding" in state else (0, 0)
    if preset is not None:
        if preset not in ("recurrentgemma-2b", "recurrentgemma-9b"):
            raise ConversionError(f"--preset must be recurrentgemma-2b or recurrentgemma-9b, got {preset!r}")
        cfg = get_preset(preset, vocab_size=vocab) if vocab else get_preset(preset)
        if width and width != cfg.width:
            raise ConversionError(
                f"tensor 'embedder.input_embedding' has width {width}, but preset {preset} has width {cfg.width}"
            )
    else:
        assert config_file is not None
        try:
            fields = read_json(config_file, CONFIG_BYTES, "a --config file")
        except FileError as e:
            raise ConversionError(str(e)) from None
        cfg = config_from_deepmind(fields)
    return cfg, from_deepmind_state_dict(state, cfg)


def convert(
    src: str | Path, dst: str | Path, config_file: str | Path | None = None, preset: str | None = None
) -> ModelConfig:
    """Convert an HF directory (RecurrentGemma or Llama-family), a GGUF file (Llama-family, its
    tokenizer too) or a DeepMind state dict into a griffon checkpoint at ``dst``.

    Everything is read and checked before anything is written; the output appears atomically.
    """
    src, dst = Path(src), Path(dst)
    if not src.exists():
        raise ConversionError(f"source not found: {src}")
    if dst.exists() and any(dst.iterdir()):
        raise ConversionError(f"destination {dst} exists and is not empty; refusing to overwrite")
    tokenizer_files: dict[str, bytes] = {}
    if src.is_dir():
        if not (src / CONFIG_NAME).is_file():
            raise ConversionError(f"{src} is a directory without {CONFIG_NAME}: not an HF checkpoint")
        cfg, state = _read_hf_dir(src)
        cfg.extra["converted_from"] = f"hf:{src.name}"
    elif src.suffix == ".gguf":
        cfg, state, tokenizer_files = llama.read_gguf(src)
        cfg.extra["converted_from"] = f"gguf:{src.name}"
    else:
        cfg, state = _read_deepmind(src, Path(config_file) if config_file else None, preset)
        cfg.extra["converted_from"] = f"deepmind:{src.name}"
    with atomic_directory(dst) as tmp:
        save_state_dict(state, tmp / WEIGHTS_NAME)
        (tmp / CONFIG_NAME).write_text(cfg.to_json())
        for name, data in tokenizer_files.items():
            (tmp / name).write_bytes(data)
    return cfg


def export_hf(
    cfg: ModelConfig,
    state: Tensors,
    dst: str | Path,
    tokenizer: Tokenizer | None = None,
    chat_template: str | None = None,
) -> None:
    """Write a model (its config and weights in griffon's names: ``ModelSource.state_dict`` of any
    source, a LoRA run merged) as an HF directory (config.json + model.safetensors): Llama's layout
    for a Llama-family model (:func:`~griffon.checkpoint.llama.llama_problems` finds nothing), else
    RecurrentGemma's,
    with ``tokenizer`` in the form ``transformers.AutoTokenizer`` loads (:meth:`Tokenizer.save_hf`)
    and ``chat_template`` (Jinja source) as ``chat_template.jinja``, which its ``apply_chat_template`` reads."""
    if not llama.llama_problems(cfg):
        hf_cfg, hf_state = llama.config_to_llama(cfg), llama.to_llama_state_dict(state)
    else:
        hf_cfg, hf_state = config_to_hf(cfg), to_hf_state_dict(state)
    dst = Path(dst)
    if dst.is_symlink():  # write into the directory the link names; the link stays as it is
        target = dst.resolve()
        if not target.is_dir():
            raise ConversionError(f"destination {dst} is a link to {target}, which is not a directory")
        dst = target
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise ConversionError(f"destination {dst} exists and is not an empty directory; refusing to overwrite")
    with atomic_directory(dst) as tmp:
        save_state_dict(hf_state, tmp / "model.safetensors", {"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(hf_cfg, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_hf(tmp)
        if chat_template is not None:
            (tmp / "chat_template.jinja").write_text(chat_template, encoding="utf-8")


__all__ = ["ConversionError", "convert", "export_hf", "config_from_deepmind", "config_from_hf"]
