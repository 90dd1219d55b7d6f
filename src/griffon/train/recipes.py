"""Named training recipes: whole ``TrainConfig``s that reproduce a paper's setup (``griffon train NAME``).

``structuredffn-{s,m,l,xl}``: the StructuredFFN papers' GPT-2-style transformers (Wei et al. 2024,
arXiv 2406.16450) as their code (CLAIRE-Labo/StructuredFFN, ``refinedweb_config.yaml`` and
``experiment/basic.sh``) trains them: GPT-2 initialisation N(0, 0.02) with q/k/v biases; AdamW with
weight decay 0.1 on every parameter, betas (0.9, 0.999); peak learning rate 6e-4 / 3e-4 / 2.5e-4 /
2e-4; 10% linear warmup, cosine to 0.1x; gradient clipping 1.0; 512 sequences of 1024 tokens per
step; 2.2B / 6.7B / 14.58B / 25.5B tokens. Their data is RefinedWeb tokenized with LLaMA's 32k
tokenizer (``huggyllama/llama-7b``, hence the 32000-token vocabulary): give yours with ``--set
data.path=DIR``. The 512 sequences are ``data.batch_size`` x ``data.grad_accum`` on one process;
with N processes divide ``grad_accum`` by N. Structured variants set ``model.ffn_structure`` (their
ranks and block counts: docs/structured_ffn.md).

``structuredffn-{s,m,l,xl}-{lowrank,blockshuffle,blockdense}32-guided``: their self-guided runs
(``experiment/sgd.sh``): the structured FFN at 32% of the dense one's parameters, trained for the
dense model's FLOPs (``self_guided.mode=fixed_flops`` with ``reduce_flop``), the extra steps
re-reading the guided phase's data, with the guided fraction they chose per size and kind
(:data:`GUIDED_FRACTIONS`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from griffon.config import ConfigError, LinearStructure
from griffon.files import CONFIG_BYTES, FileError, read_json
from griffon.presets import get_preset, preset_tokens
from griffon.train.config import DataConfig, OptimConfig, SelfGuidedConfig, TrainConfig

_RECIPES: dict[str, Callable[[], TrainConfig]] = {}

_STRUCTUREDFFN_LR = {"s": 6e-4, "m": 3e-4, "l": 2.5e-4, "xl": 2e-4}
GUIDED_FRACTIONS = {
    "lowrank": {"s": 0.30, "m": 0.38, "l": 0.41, "xl": 0.43},
    "blockshuffle": {"s": 0.30, "m": 0.38, "l": 0.41, "xl": 0.43},
    "blockdense": {"s": 0.30, "m": 0.40, "l": 0.41, "xl": 0.45},
}
"""The guided share of the dense run's steps in the StructuredFFN code's self-guided runs at 32%
(``experiment/sgd.sh``; its fixed-step ablation uses 0.5)."""


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


def structure_32(kind: str, size: str) -> LinearStructure:
    """The StructuredFFN runs' structure at about 32% of the dense FFN's parameters: LowRank of
    rank width/4, BlockShuffle of 4 blocks, BlockDense of 2 blocks and rank width/3 (s, l) or 4
    blocks and rank 3/8 of the width (m, xl), as their ``experiment/basic.sh`` sets them."""
    width = get_preset(f"structuredffn-{size}").width
    if kind == "lowrank":
        return LinearStructure(kind=kind, rank=width // 4)
    if kind == "blockshuffle":
        return LinearStructure(kind=kind, blocks=4)
    if size in ("s", "l"):
        return LinearStructure(kind=kind, blocks=2, rank=width // 3)
    return LinearStructure(kind=kind, blocks=4, rank=3 * width // 8)


for _kind, _fractions in GUIDED_FRACTIONS.items():
    for _size, _fraction in _fractions.items():

        def _guided(kind: str = _kind, size: str = _size, fraction: float = _fraction) -> TrainConfig:
            base = get_recipe(f"structuredffn-{size}")
            return dataclasses.replace(
                base,
                model=base.model.replace(ffn_structure=structure_32(kind, size)),
                self_guided=SelfGuidedConfig(
                    enabled=True, fraction=fraction, mode="fixed_flops", reduce_flop=True, extra_steps_data="reread"
                ),
            )

        _RECIPES[f"structuredffn-{_size}-{_kind}32-guided"] = _guided


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
        d = read_json(path, CONFIG_BYTES, "a config file")
    except FileError:
        return TrainConfig.load(path).to_dict()  # raises the config loader's clear error
    return d if isinstance(d, dict) and d.get("model") == "auto" else TrainConfig.load(path).to_dict()
