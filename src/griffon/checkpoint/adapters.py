"""LoRA (Hu et al. 2021, arXiv 2106.09685) through ``peft``, wrapped around the model from outside
as :mod:`griffon.train.parallelize` wraps it: the model definition knows nothing of adapters.
Training adds them (``lora.rank``); every reader merges them (:mod:`griffon.checkpoint.source`).

``peft`` replaces each targeted ``nn.Linear`` (by module name: the attention projections ``q``,
``k``, ``v``, ``o``; the recurrent block's ``linear_x``, ``linear_y``, ``linear_out``; the gated
FFN's ``gate``, ``up``, ``down``) with the frozen layer plus a trainable low-rank update
``(alpha / rank) B A``, B initialised to zero so training starts from the base model's function.
Every other parameter is frozen: embeddings, norms, the convolution, the RG-LRU's block-diagonal
gates and ``a_param``, and a structured FFN's factors (raw parameters, not ``nn.Linear``; peft's
custom-module route would need a LoRA form for each structure, which none of the StructuredFFN
papers defines).

A LoRA run's checkpoints hold the adapters only (``adapter.safetensors``, in peft's names, and
``adapter.json``: rank, alpha, dropout, targets and the base model); reading one for inference
builds the base model, adds the adapters and merges them (:class:`griffon.checkpoint.ModelSource`),
so every command that reads a checkpoint reads a LoRA run as a plain model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from griffon.checkpoint.format import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_NAME,
    CheckpointError,
    read_safetensors,
    save_state_dict,
)
from griffon.config import ConfigError
from griffon.model import Griffon

DEFAULT_LORA_TARGETS = ("q", "k", "v", "o", "linear_x", "linear_y", "linear_out", "gate", "up", "down")
"""The linears LoRA adapts unless told otherwise: attention, the recurrent block's projections, the FFN."""


def _peft():
    try:
        import peft
    except ImportError:
        raise ConfigError("LoRA needs peft: pip install 'griffon[finetune]'") from None
    return peft


def lora_targets(model: Griffon, targets: tuple[str, ...] | None) -> tuple[str, ...]:
    """The linears to adapt: ``targets``, each of which must name one of the model's, or (None)
    those of :data:`DEFAULT_LORA_TARGETS` it has. :class:`ConfigError` naming what matches nothing."""
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    if targets is None:
        targets = tuple(t for t in DEFAULT_LORA_TARGETS if t in names)
    missing = sorted(set(targets) - names)
    if missing or not targets:
        raise ConfigError(
            f"lora.targets {', '.join(missing) or '(default)'} match no linear layer of this model "
            f"(it has: {', '.join(sorted(names)) or 'none'})"
        )
    return targets


def apply_lora(model: Griffon, rank: int, alpha: float, dropout: float, targets: tuple[str, ...] | None) -> Griffon:
    """Add LoRA adapters to ``model``'s linears named in ``targets`` (:func:`lora_targets`), in
    place, and freeze every other parameter."""
    peft = _peft()
    config = peft.LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(lora_targets(model, targets))
    )
    return peft.inject_adapter_in_model(config, model)


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' weights, in peft's names (``blocks.0.temporal.q.lora_A.weight``)."""
    return {k: v.detach().contiguous() for k, v in _peft().get_peft_model_state_dict(model).items()}


def save_adapter(model: nn.Module, directory: Path, meta: dict[str, Any]) -> None:
    """Write the adapters and ``meta`` (rank, alpha, dropout, targets, base) into ``directory``."""
    save_state_dict(adapter_state_dict(model), directory / ADAPTER_NAME)
    (directory / ADAPTER_CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")


def read_adapter_meta(directory: Path) -> dict[str, Any]:
    path = directory / ADAPTER_CONFIG_NAME
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
    needed = ("rank", "alpha", "dropout", "targets", "base")
    if not isinstance(meta, dict) or any(k not in meta for k in needed):
        raise CheckpointError(f"{path} must hold {', '.join(needed)}")
    return meta


def load_adapter(model: nn.Module, directory: Path) -> None:
    """Load ``directory``'s adapters into ``model`` (which has them, :func:`apply_lora`);
    :class:`CheckpointError` naming the first missing or extra tensor."""
    state = read_safetensors(directory / ADAPTER_NAME)
    expected = adapter_state_dict(model)
    for name in expected:
        if name not in state:
            raise CheckpointError(f"{directory / ADAPTER_NAME}: missing adapter tensor {name!r}")
        if state[name].shape != expected[name].shape:
            raise CheckpointError(
                f"{directory / ADAPTER_NAME}: adapter tensor {name!r} has shape {tuple(state[name].shape)}, "
                f"the model's is {tuple(expected[name].shape)}"
            )
    extra = sorted(set(state) - set(expected))
    if extra:
        raise CheckpointError(f"{directory / ADAPTER_NAME}: unexpected adapter tensor {extra[0]!r}")
    _peft().set_peft_model_state_dict(model, state)


def merge_lora(model: Griffon) -> Griffon:
    """Fold every adapter into its base layer (W + (alpha / rank) B A) and put the plain
    ``nn.Linear`` back in its place: a model with no trace of peft."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, module.get_base_layer())
    for p in model.parameters():
        p.requires_grad_(True)
    return model
