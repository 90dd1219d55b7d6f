"""The reference implementations of the Griffin family, built offline with random weights.

- DeepMind's PyTorch port from ``recurrentgemma==1.0.1`` (imported without its flax/jax half).
- HF transformers ``RecurrentGemmaForCausalLM``.

Both are optional: the parity tests use them as oracles and ``griffon bench train`` times them.
A missing package raises :class:`ReferenceUnavailable`.
"""

from __future__ import annotations

import importlib.util
import sys
import types

import torch

from griffon.checkpoint.convert import config_from_hf, from_deepmind_state_dict, from_hf_state_dict
from griffon.config import ModelConfig
from griffon.model import Griffon


class ReferenceUnavailable(ImportError):
    """The reference package is not installed."""


def deepmind():
    """Return ``(common, griffin)`` modules of the DeepMind torch port."""
    if "recurrentgemma" not in sys.modules:
        spec = importlib.util.find_spec("recurrentgemma")
        if spec is None:
            raise ReferenceUnavailable("recurrentgemma (DeepMind port) is not installed")
        # Register a bare package so that importing the torch port does not pull in flax.
        pkg = types.ModuleType("recurrentgemma")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["recurrentgemma"] = pkg
    from recurrentgemma import common
    from recurrentgemma.torch import griffin

    return common, griffin


def deepmind_fields(cfg: ModelConfig) -> dict:
    """DeepMind GriffinConfig fields equivalent to a griffon config (MQA, deepmind window)."""
    assert cfg.num_kv_heads == 1 and cfg.window_semantics == "deepmind"
    return dict(
        vocab_size=cfg.vocab_size, width=cfg.width, mlp_expanded_width=cfg.resolved_mlp_width,
        num_heads=cfg.num_heads, block_types=[t.upper() for t in cfg.block_types],
        embeddings_scale_by_sqrt_dim=cfg.embed_scale, attention_window_size=cfg.attention_window,
        logits_soft_cap=cfg.logit_soft_cap, lru_width=cfg.lru_width,
    )  # fmt: skip


def deepmind_pair(cfg: ModelConfig, seed: int = 0):
    """A random DeepMind model and the griffon model converted from its state dict."""
    common, griffin = deepmind()
    fields = deepmind_fields(cfg)
    fields["block_types"] = tuple(common.TemporalBlockType[b] for b in fields["block_types"])
    torch.manual_seed(seed)
    ref = griffin.Griffin(common.GriffinConfig(**fields)).eval()
    _randomize(ref)
    ours = Griffon(cfg).eval()
    ours.load_state_dict(from_deepmind_state_dict(ref.state_dict(), cfg))
    return ref, ours


def hf_pair(cfg: ModelConfig, seed: int = 0):
    """A random HF RecurrentGemmaForCausalLM and the griffon model converted from it."""
    try:
        import transformers
    except ImportError:
        raise ReferenceUnavailable("transformers is not installed") from None
    from griffon.checkpoint.convert import hf_transformers_config

    hf_cfg = hf_transformers_config(cfg)
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    ref = transformers.RecurrentGemmaForCausalLM(hf_cfg).eval()
    _randomize(ref)
    ours_cfg = config_from_hf(hf_cfg.to_dict())
    ours = Griffon(ours_cfg).eval()
    ours.load_state_dict(from_hf_state_dict(ref.state_dict(), ours_cfg))
    return ref, ours


def _randomize(model: torch.nn.Module) -> None:
    """Perturb every parameter: zero-initialised norms and biases would hide mapping mistakes."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "a_param" in name or "recurrent_param" in name:
                continue  # keep the decay in its trained range
            p.add_(torch.randn_like(p) * 0.1)
