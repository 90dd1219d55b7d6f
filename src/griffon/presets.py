"""Named model configurations: tiny ones for tests, the published models, a scaling ladder."""

from __future__ import annotations

from collections.abc import Callable

from griffon.config import ConfigError, ModelConfig

GRIFFIN = ("recurrent", "recurrent", "attention")
HAWK = ("recurrent",)
TRANSFORMER = ("attention",)
_PATTERNS = {"griffin": GRIFFIN, "hawk": HAWK, "mqa": TRANSFORMER}

_PRESETS: dict[str, Callable[[], ModelConfig]] = {}


def register(name: str) -> Callable[[Callable[[], ModelConfig]], Callable[[], ModelConfig]]:
    def wrap(fn: Callable[[], ModelConfig]) -> Callable[[], ModelConfig]:
        _PRESETS[name] = fn
        return fn

    return wrap


def preset_names() -> list[str]:
    return sorted(_PRESETS)


def get_preset(name: str, **overrides: object) -> ModelConfig:
    """Return a fresh config for preset ``name``, with optional field overrides."""
    if name not in _PRESETS:
        import difflib

        hint = difflib.get_close_matches(name, list(_PRESETS), n=1)
        suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ConfigError(f"unknown preset {name!r}{suggestion}; known: {', '.join(preset_names())}")
    cfg = _PRESETS[name]()
    return cfg.replace(**overrides) if overrides else cfg


# ----- tiny models for tests and the CPU demo -------------------------------------------------
for _family, _pattern in _PATTERNS.items():

    def _tiny(pattern: tuple[str, ...] = _pattern) -> ModelConfig:
        return ModelConfig(
            vocab_size=256, width=64, num_layers=3, block_pattern=pattern, num_heads=2,
            attention_window=None if pattern == TRANSFORMER else 16, mlp_width=192,
            max_seq_len=128 if pattern == TRANSFORMER else None,
        )  # fmt: skip

    register(f"{_family}-tiny")(_tiny)


@register("griffin-small")
def _griffin_small() -> ModelConfig:
    """The 4.9M-parameter byte-level Griffin used by the CPU benchmarks and the demo run."""
    return ModelConfig(vocab_size=256, width=256, num_layers=6, num_heads=4, attention_window=1024)


@register("griffin-demo")
def _griffin_demo() -> ModelConfig:
    """The default model of `griffon train`: 1.8M parameters, sized for minutes on a 2-core CPU."""
    return ModelConfig(vocab_size=256, width=192, num_layers=4, num_heads=3, attention_window=128)


# ----- published models -----------------------------------------------------------------------
@register("griffin-paper-7b")
def _griffin_7b() -> ModelConfig:
    return ModelConfig(
        vocab_size=256000, width=4096, num_layers=32, block_pattern=GRIFFIN, num_heads=32,
        lru_width=5632, mlp_width=12288, attention_window=1024, embed_scale=False, logit_soft_cap=0.0,
    )  # fmt: skip


@register("hawk-paper-7b")
def _hawk_7b() -> ModelConfig:
    return _griffin_7b().replace(block_pattern=HAWK)


@register("recurrentgemma-2b")
def _rg_2b() -> ModelConfig:
    return ModelConfig(
        vocab_size=256000, width=2560, num_layers=26, block_pattern=GRIFFIN, num_heads=10,
        lru_width=2560, mlp_width=7680, attention_window=2048, embed_scale=True, logit_soft_cap=30.0,
    )  # fmt: skip


@register("recurrentgemma-9b")
def _rg_9b() -> ModelConfig:
    return ModelConfig(
        vocab_size=256000, width=4096, num_layers=38, block_pattern=GRIFFIN, num_heads=16,
        lru_width=4096, mlp_width=12288, attention_window=2048, embed_scale=True, logit_soft_cap=30.0,
    )  # fmt: skip


# ----- scaling ladder -------------------------------------------------------------------------
# Sizes follow the shape of the Griffin paper's scaling study (width, recurrent width ~4/3 of it,
# MLP expansion 3, MQA with head_dim 128 where it divides), with a 32k vocabulary so that the
# non-embedding share resembles the paper's models. Griffin's window is 1024 as in the paper;
# the MQA transformer baseline attends globally.
_LADDER = {
    # name: (width, lru_width, layers, heads)
    "20m": (256, 384, 6, 2),
    "60m": (512, 768, 8, 4),
    "100m": (768, 1024, 12, 6),
    "400m": (1024, 1536, 24, 8),
    "1b": (1536, 2048, 24, 12),
    "3b": (2048, 3072, 32, 16),
    "7b": (4096, 5632, 32, 32),
    "14b": (5120, 8192, 40, 40),
}
for _size, (_w, _lru, _layers, _heads) in _LADDER.items():
    for _family, _pattern in _PATTERNS.items():

        def _rung(
            w: int = _w, lru: int = _lru, layers: int = _layers, heads: int = _heads,
            pattern: tuple[str, ...] = _pattern,
        ) -> ModelConfig:  # fmt: skip
            return ModelConfig(
                vocab_size=32000, width=w, num_layers=layers, block_pattern=pattern, num_heads=heads,
                lru_width=lru, lru_num_blocks=heads if lru % heads == 0 else lru // 128, mlp_width=3 * w,
                attention_window=None if pattern == TRANSFORMER else 1024,
                max_seq_len=2048 if pattern == TRANSFORMER else None,
                embed_scale=True, logit_soft_cap=30.0,
            )  # fmt: skip

        register(f"{_family}-{_size}")(_rung)


# ----- the StructuredFFN papers' transformers (arXiv 2406.16450) -------------------------------
# GPT-2 style: LayerNorm, GeLU MLP with biases (4x), full RoPE, multi-head global attention,
# context 1024, tied embeddings, 32k vocabulary. Structured variants: set model.ffn_structure.
_STRUCTUREDFFN = {"s": (768, 12, 12), "m": (1024, 24, 16), "l": (1536, 24, 12), "xl": (2048, 24, 16)}
for _size, (_w, _layers, _heads) in _STRUCTUREDFFN.items():

    def _sffn(w: int = _w, layers: int = _layers, heads: int = _heads) -> ModelConfig:
        return ModelConfig(
            vocab_size=32000, width=w, num_layers=layers, block_pattern=TRANSFORMER, num_heads=heads,
            num_kv_heads=heads, attention_window=None, max_seq_len=1024, mlp_width=4 * w, mlp_type="gelu",
            norm_type="layernorm", norm_eps=1e-5, rope_fraction=1.0, embed_scale=False, logit_soft_cap=0.0,
        )  # fmt: skip

    register(f"structuredffn-{_size}")(_sffn)
