"""Llama-family checkpoints (Llama, Mistral, SmolLM2) as griffon's transformer, and back.

A Llama-architecture model is griffon's attention-only family with Llama's conventions, which the
config states: the SwiGLU MLP (``mlp_type="swiglu"``), RMSNorm's gain without Gemma's unit offset
(``norm_unit_offset=False``), no biases (``proj_bias=False``), rotary embeddings on all of each
head in the rotate-half layout HF checkpoints store (``rope_fraction=1``, ``rope_base`` the
model's ``rope_theta``), no embedding scale, no soft cap, tied or untied embeddings, and global
attention (``max_seq_len`` the model's ``max_position_embeddings``) or Mistral's sliding window
(``attention_window`` with HF's semantics: ``window`` keys, the query's own among them). Name maps
are spelled out as tables against ``transformers.models.llama.modeling_llama``.

GGUF files are read through transformers' own GGUF loading (``pip install gguf``), which
dequantises the weights and undoes llama.cpp's permutation of the query and key rows.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from griffon.checkpoint.format import CheckpointError, check_fits
from griffon.config import ConfigError, ModelConfig

Tensors = dict[str, torch.Tensor]

MODEL_TYPES = ("llama", "mistral")
"""HF ``model_type`` values read as Llama-family models."""

_LAYER_NAMES = {
    "temporal_norm.scale": "input_layernorm.weight",
    "temporal.q.weight": "self_attn.q_proj.weight",
    "temporal.k.weight": "self_attn.k_proj.weight",
    "temporal.v.weight": "self_attn.v_proj.weight",
    "temporal.o.weight": "self_attn.o_proj.weight",
    "channel_norm.scale": "post_attention_layernorm.weight",
    "mlp.gate.weight": "mlp.gate_proj.weight",
    "mlp.up.weight": "mlp.up_proj.weight",
    "mlp.down.weight": "mlp.down_proj.weight",
}
"""griffon's names inside ``blocks.N.`` -> HF's inside ``model.layers.N.``."""
_TOP_NAMES = {"embed.weight": "model.embed_tokens.weight", "final_norm.scale": "model.norm.weight",
              "head.weight": "lm_head.weight"}  # fmt: skip


class LlamaError(CheckpointError):
    """A Llama-family checkpoint cannot be read or written; the message names the field or tensor."""


def is_llama(hf: dict[str, Any]) -> bool:
    """Whether an HF ``config.json`` describes a Llama-family model."""
    return hf.get("model_type") in MODEL_TYPES


def _rope_theta(hf: dict[str, Any]) -> float:
    """The rotary base, from transformers 5's ``rope_parameters`` or 4's ``rope_theta``; scaled
    rotary embeddings (Llama 3.1's, YaRN, ...) are refused."""
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    kind = rope.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if kind != "default":
        raise LlamaError(f"rotary scaling {kind!r} is not supported (only unscaled rotary embeddings)")
    return float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))


def config_from_llama(hf: dict[str, Any]) -> ModelConfig:
    """A griffon config from an HF Llama or Mistral ``config.json`` dict; :class:`LlamaError`
    naming what griffon cannot represent."""
    if not is_llama(hf):
        raise LlamaError(f"config.json has model_type {hf.get('model_type')!r}, expected one of {MODEL_TYPES}")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if not isinstance(hf.get(key), int):
            raise LlamaError(f"config.json lacks the integer {key!r}")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise LlamaError(f"hidden_act {act!r} is not supported (Llama's MLP is SwiGLU: silu)")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise LlamaError(f"{key}=true is not supported (griffon's Llama-family models have no biases)")
    window = hf.get("sliding_window") if hf.get("use_sliding_window", True) else None
    heads = hf["num_attention_heads"]
    try:
        return ModelConfig(
            vocab_size=hf["vocab_size"], width=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
            block_pattern=("attention",), num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads, mlp_width=hf["intermediate_size"],
            mlp_type="swiglu", norm_unit_offset=False, tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            proj_bias=False, qkv_bias=False, embed_scale=False, logit_soft_cap=0.0,
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)), rope_fraction=1.0, rope_base=_rope_theta(hf),
            attention_window=window, window_semantics="hf",
            max_seq_len=hf.get("max_position_embeddings") if window is None else None,
        )  # fmt: skip
    except ConfigError as e:
        raise LlamaError(f"config.json: {e}") from None


def llama_problems(cfg: ModelConfig) -> list[str]:
    """What keeps ``cfg`` from being written as a Llama-family model (empty: nothing)."""
    wanted = {"block_pattern": ("attention",), "mlp_type": "swiglu", "norm_type": "rmsnorm",
              "norm_unit_offset": False, "proj_bias": False, "qkv_bias": False, "embed_scale": False,
              "logit_soft_cap": 0.0, "rope_fraction": 1.0}  # fmt: skip
    problems = [f"{k}={getattr(cfg, k)!r} (Llama has {v!r})" for k, v in wanted.items() if getattr(cfg, k) != v]
    if cfg.attention_window is not None and cfg.window_semantics != "hf":
        problems.append("a sliding window with deepmind semantics (Mistral's counts the query's own key: hf)")
    if cfg.ffn_structure.is_structured() or cfg.moe.enabled:
        problems.append("a structured or mixture-of-experts FFN")
    return problems


def config_to_llama(cfg: ModelConfig) -> dict[str, Any]:
    """An HF ``config.json`` dict for ``cfg`` (Mistral's when it has a sliding window)."""
    problems = llama_problems(cfg)
    if problems:
        raise LlamaError("this model is not a Llama-family one: " + "; ".join(problems))
    mistral = cfg.attention_window is not None
    return {
        "architectures": ["MistralForCausalLM" if mistral else "LlamaForCausalLM"],
        "model_type": "mistral" if mistral else "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.width, "intermediate_size": cfg.resolved_mlp_width,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.resolved_head_dim, "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_base, "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False, "mlp_bias": False, "sliding_window": cfg.attention_window,
        "max_position_embeddings": cfg.max_seq_len or 131072, "torch_dtype": "float32",
    }  # fmt: skip


def from_llama_state_dict(src: Tensors, cfg: ModelConfig) -> Tensors:
    """Map an HF ``LlamaForCausalLM`` state dict onto griffon's names; every tensor used once, and
    a tied model's ``lm_head.weight`` (if stored) equal to the embedding."""
    names = dict(_TOP_NAMES)
    if cfg.tie_embeddings:
        del names["head.weight"]
    for i in range(cfg.num_layers):
        names |= {f"blocks.{i}.{ours}": f"model.layers.{i}.{theirs}" for ours, theirs in _LAYER_NAMES.items()}
    missing = [theirs for theirs in names.values() if theirs not in src]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise LlamaError(f"the checkpoint lacks tensor {missing[0]!r}{more}")
    out = {ours: src[theirs] for ours, theirs in names.items()}
    extra = sorted(set(src) - set(names.values()) - {"lm_head.weight"})
    extra = [k for k in extra if not k.endswith("rotary_emb.inv_freq")]  # a buffer older exports keep
    if extra:
        raise LlamaError(f"unexpected tensor {extra[0]!r} in a Llama checkpoint of {cfg.num_layers} layers")
    if cfg.tie_embeddings and "lm_head.weight" in src and not torch.equal(src["lm_head.weight"], out["embed.weight"]):
        raise LlamaError("tie_word_embeddings is true but 'lm_head.weight' differs from the embedding")
    try:
        check_fits(cfg, out, "the Llama checkpoint")
    except CheckpointError as e:
        raise LlamaError(str(e)) from None
    return out


def to_llama_state_dict(state: Tensors) -> Tensors:
    """griffon's names onto HF Llama's (the inverse of :func:`from_llama_state_dict`)."""
    out: Tensors = {}
    for name, value in state.items():
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
        if name in _TOP_NAMES:
            out[_TOP_NAMES[name]] = value
        elif m and m.group(2) in _LAYER_NAMES:
            out[f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"] = value
        else:
            raise LlamaError(f"no Llama name for tensor {name!r}")
    return out


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
"""What a GGUF file's tokenizer is kept as beside the converted weights (the last two if it has them)."""


def read_gguf(path: Path) -> tuple[ModelConfig, Tensors, dict[str, bytes]]:
    """A GGUF file's config and weights (dequantised to float32, griffon's names) and its
    tokenizer's files (:data:`TOKENIZER_FILES`, name -> contents): through transformers' GGUF loading."""
    try:
        import gguf  # noqa: F401  (transformers needs it to read GGUF)
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise LlamaError("reading GGUF needs the gguf and transformers packages: pip install 'griffon[gguf]'") from None
    where = {"pretrained_model_name_or_path": str(path.parent), "gguf_file": path.name}
    try:
        hf = AutoConfig.from_pretrained(**where).to_dict()
        cfg = config_from_llama(hf)  # before the weights: a model griffon cannot hold is refused first
        model = AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32)
        with tempfile.TemporaryDirectory(prefix="griffon-gguf-") as tmp:
            AutoTokenizer.from_pretrained(**where).save_pretrained(tmp)
            files = {name: (Path(tmp) / name).read_bytes() for name in TOKENIZER_FILES if (Path(tmp) / name).is_file()}
    except (ValueError, OSError, KeyError, RuntimeError) as e:
        raise LlamaError(f"{path}: cannot read it as a GGUF model ({type(e).__name__}: {str(e)[:200]})") from None
    if "tokenizer.json" not in files:
        raise LlamaError(f"{path}: its tokenizer could not be written as tokenizer.json")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    return cfg, from_llama_state_dict(state, cfg), files
