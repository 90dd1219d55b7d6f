"""Named training recipes: whole ``TrainConfig``s that reproduce a paper's setup (``griffon train NAME``).

``structuredffn-{s,m,l,xl}``: the StructuredFFN papers' GPT-2-style transformers (Wei et al. 2024,
arXiv 2406.16450) as their code (CLAIRE-Labo/StructuredFFN, ``refinedweb_config.yaml`` and
``experiment/basic.sh``) trains them: GPT-2 initialisation N(0, 0.02) with q/k/v biases; AdamW with
weight decay 0.1 on every parameter, betas (0.9, 0.999); peak learning rate 6e-4 / 3e-4 / 2.5e-4 /
2e-4; 10% linear warmup, cosine to 0.1x; gradient clipping 1.0; 512 sequences of 1024 tokens per
step; 2.2B / 6.7B / 14.58B / 25.5B tokens. Their data is RefinedWeb with the GPT-2 tokenizer: give
yours with ``--set data.path=DIR``. The 512 sequences are ``data.batch_size`` x ``data.grad_accum``
on one process; with N processes divide ``grad_accum`` by N. Structured variants set
``model.ffn_structure`` (their ranks and block counts: docs/structured_ffn.md).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from griffon.config import ConfigError
from griffon.presets import get_preset, preset_tokens
from griffon.train.config import DataConfig, OptimConfig, TrainConfig

_RECIPES: dict[str, Callable[[], TrainConfig]] = {}

_STRUCTUREDFFN_LR = {"s": 6e-4, "m": 3e-4, "l": 2.5e-4, "xl": 2e-4}


def recipe_names() -> list[str]:
    return sorted(_RECIPES)


def get_recipe(name: str) -> TrainConfig:
    """A fresh training config for recipe ``name``."""
    if name not in _RECIPES:
        raise ConfigError(f"unknown recipe {name!r}; known: {', '.join(recipe_names())}")
    return _RECIPES[name]()


for _size, _lr in _STRUCTUREDFFN_LR.items():

    def _structuredffn(size: str = _size, lr: float = _lr) -> TrainConfig:
        name = f"structuredffn-{size}"
        return TrainConfig(
            model=get_preset(name, qkv_bias=True, init="gpt2", init_std=0.02),
            data=DataConfig(seq_len=1024, batch_size=16, grad_accum=32),
            optim=OptimConfig(
                lr=lr,
                weight_decay=0.1,
                decay="all",
                beta1=0.9,
                beta2=0.999,
                schedule="cosine",
                warmup_fraction=0.1,
                min_lr_ratio=0.1,
                grad_clip=1.0,
            ),  # fmt: skip
            max_tokens=int(preset_tokens(name) or 0),
            max_minutes=None,
        )

    _RECIPES[f"structuredffn-{_size}"] = _structuredffn


def starting_config(config: str | None, overrides: list[str]) -> dict:
    """The config dict ``griffon train`` starts from: a JSON file, a recipe's name, or the defaults
    with ``model=auto`` when no override names a model."""
    if config is None:
        d = TrainConfig().to_dict()
        if not any(o.split("=", 1)[0].split(".")[0] == "model" for o in overrides):
            d["model"] = "auto"
        return d
    if not Path(config).exists() and config in recipe_names():
        return get_recipe(config).to_dict()
    path = Path(config)
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return TrainConfig.load(path).to_dict()  # raises the config loader's clear error
    return d if isinstance(d, dict) and d.get("model") == "auto" else TrainConfig.load(path).to_dict()
