"""Model configuration: a typed dataclass that validates itself and round-trips to JSON."""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from griffon.files import CONFIG_BYTES, FileError, read_text

BlockType = Literal["recurrent", "attention"]
BLOCK_TYPES: tuple[str, ...] = ("recurrent", "attention")
WINDOW_SEMANTICS: tuple[str, ...] = ("deepmind", "hf")
LINEAR_KINDS: tuple[str, ...] = ("dense", "lowrank", "blockshuffle", "blockdense")
MLP_TYPES: tuple[str, ...] = ("geglu", "swiglu", "gelu")
GATED_MLP_TYPES: tuple[str, ...] = ("geglu", "swiglu")
NORM_TYPES: tuple[str, ...] = ("rmsnorm", "layernorm")
INIT_SCHEMES: tuple[str, ...] = ("griffin", "gpt2")


class ConfigError(ValueError):
    """A configuration value or file is invalid. The message names the field."""


@dataclass
class LinearStructure:
    """Which linear layer the FFN projections use (see :mod:`griffon.nn.structured`).

    ``lowrank`` needs ``rank``; ``blockshuffle`` needs ``blocks``; ``blockdense`` needs both.
    For a 4x FFN, ``rank = width / 2`` or ``blocks = 2`` keeps 63% of the dense FFN's parameters,
    ``rank = width / 4`` or ``blocks = 4`` keeps 32%.
    """

    kind: str = "dense"
    """``dense``, ``lowrank``, ``blockshuffle`` or ``blockdense``."""
    rank: int | None = None
    """Inner width of ``lowrank`` and ``blockdense``."""
    blocks: int | None = None
    """Diagonal blocks of ``blockshuffle`` and ``blockdense``."""
    keep_first_dense: bool = True
    """Keep the first layer's FFN dense, as the StructuredFFN papers do."""
    merge_threshold: int | None = None
    """Calls with at most this many tokens and autograd off use the pre-merged dense weight.
    ``None``: measured per layer shape when generation starts
    (:func:`griffon.decode.calibrate_merge_thresholds`, which `griffon sample` calls), never merged before that; the
    crossover depends on the machine, the width and the kind (docs/structured_ffn.md)."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        check_types(self)
        if self.kind not in LINEAR_KINDS:
            raise ConfigError(f"ffn_structure.kind {self.kind!r} is not one of {LINEAR_KINDS}")
        needs = {"dense": (), "lowrank": ("rank",), "blockshuffle": ("blocks",), "blockdense": ("rank", "blocks")}
        for name in ("rank", "blocks"):
            value = getattr(self, name)
            if name in needs[self.kind]:
                if value is None or value <= 0:
                    raise ConfigError(f"ffn_structure.{name} must be a positive integer for kind {self.kind!r}")
            elif value is not None:
                raise ConfigError(f"ffn_structure.{name} does not apply to kind {self.kind!r}; leave it null")
        if self.merge_threshold is not None and self.merge_threshold < 0:
            raise ConfigError(f"ffn_structure.merge_threshold must be >= 0, got {self.merge_threshold}")

    def check_shape(self, in_features: int, out_features: int) -> None:
        """Raise :class:`ConfigError` if an ``in -> out`` layer of this kind cannot be built."""
        where = f"an FFN projection {in_features} -> {out_features}"
        if self.kind in ("lowrank", "blockdense") and self.rank > min(in_features, out_features):  # type: ignore[operator]
            raise ConfigError(f"ffn_structure.rank {self.rank} exceeds {where}'s smaller side")
        if self.kind == "blockshuffle":
            for size in (in_features, out_features):
                if size % self.blocks:  # type: ignore[operator]
                    raise ConfigError(f"ffn_structure.blocks {self.blocks} does not divide {size} in {where}")
        if self.kind == "blockdense":
            for size in (in_features, self.rank):
                if size % self.blocks:  # type: ignore[operator]
                    raise ConfigError(f"ffn_structure.blocks {self.blocks} does not divide {size} in {where}")

    def is_structured(self) -> bool:
        return self.kind != "dense"


@dataclass
class MoEConfig:
    """A mixture-of-experts FFN in place of the dense one (:mod:`griffon.nn.moe`).

    Token-choice top-k routing with softmax gates, renormalised over the chosen experts when
    ``top_k > 1`` (as Mixtral) and the router's probability itself at ``top_k = 1`` (as Switch
    Transformers: renormalising one gate makes it exactly 1 and the router learns nothing from the
    task loss), dropless. Each expert is the model's MLP (``mlp_type``, projections of
    ``ffn_structure``) at ``expert_width``. Balancing: the Switch/GShard loss, the ST-MoE router
    z-loss, and optionally DeepSeek-V3's auxiliary-loss-free per-expert bias.
    """

    num_experts: int | None = None
    """Routed experts; ``None``: a dense FFN, no routing."""
    top_k: int = 2
    """Experts each token is sent to."""
    renormalize: bool | None = None
    """Whether the chosen experts' gates are rescaled to sum to 1; ``None``: for ``top_k > 1``
    (Mixtral, arXiv 2401.04088), not for ``top_k = 1`` (Switch, arXiv 2101.03961)."""
    shared_experts: int = 0
    """Experts every token goes through besides the routed ones (as DeepSeekMoE)."""
    expert_width: int | None = None
    """Expanded width of each expert; ``None``: the model's ``mlp_width`` (each expert a copy of the dense FFN)."""
    aux_loss_coef: float = 0.01
    """Weight of the load-balancing loss ``E * sum_i f_i P_i`` (1 when balanced)."""
    z_loss_coef: float = 0.001
    """Weight of the router z-loss ``mean(logsumexp(logits)^2)``."""
    bias_update_rate: float = 0.0
    """DeepSeek-V3's balancing: after each step every expert's routing bias moves by this much
    towards the mean load (0: off; they use 0.001 with ``aux_loss_coef`` near 0)."""

    def __post_init__(self) -> None:
        self.validate()

    @property
    def enabled(self) -> bool:
        return self.num_experts is not None

    @property
    def renormalizes(self) -> bool:
        """Whether the gates are renormalised over the chosen experts (``renormalize`` resolved)."""
        return self.renormalize if self.renormalize is not None else self.top_k > 1

    def validate(self) -> None:
        check_types(self)
        if self.num_experts is None:
            return
        if self.num_experts < 1:
            raise ConfigError(f"moe.num_experts must be at least 1 (null for a dense FFN), got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(f"moe.top_k must lie in [1, num_experts={self.num_experts}], got {self.top_k}")
        if self.renormalize and self.top_k == 1:
            raise ConfigError(
                "moe.renormalize=true with top_k=1 makes every gate exactly 1, so the router gets no gradient "
                "from the task loss; leave it null (Switch's gate: the router probability)"
            )
        if self.shared_experts < 0:
            raise ConfigError(f"moe.shared_experts must be >= 0, got {self.shared_experts}")
        if self.expert_width is not None and self.expert_width <= 0:
            raise ConfigError(f"moe.expert_width must be positive or null, got {self.expert_width}")
        for name in ("aux_loss_coef", "z_loss_coef", "bias_update_rate"):
            if getattr(self, name) < 0:
                raise ConfigError(f"moe.{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class ModelConfig:
    """Architecture of a Griffin-family language model.

    The block pattern is cycled over the layers: ``("recurrent", "recurrent", "attention")``
    is Griffin, ``("recurrent",)`` is Hawk and ``("attention",)`` the MQA transformer baseline.
    """

    vocab_size: int = 256
    """Number of tokens in the vocabulary."""
    width: int = 256
    """Residual stream width (model dimension)."""
    num_layers: int = 6
    """Number of residual blocks."""
    block_pattern: tuple[str, ...] = ("recurrent", "recurrent", "attention")
    """Temporal-mixing block types, cycled over the layers."""
    num_heads: int = 4
    """Query heads of the attention blocks."""
    num_kv_heads: int = 1
    """Key/value heads: 1 is MQA, ``num_heads`` is MHA, anything dividing it is GQA."""
    head_dim: int | None = None
    """Attention head dimension; ``None`` means ``width // num_heads``."""
    lru_width: int | None = None
    """Width of the recurrent branch (RG-LRU); ``None`` means ``width``."""
    lru_num_blocks: int | None = None
    """Diagonal blocks of the RG-LRU gate linears; ``None`` means ``num_heads`` (as the references)."""
    conv_width: int = 4
    """Temporal width of the causal depthwise Conv1D in recurrent blocks."""
    attention_window: int | None = 2048
    """Local attention window; ``None`` means global attention."""
    window_semantics: str = "deepmind"
    """``deepmind``: a query sees itself and ``window`` previous keys; ``hf``: ``window`` keys in all."""
    mlp_width: int | None = None
    """Expanded width of the MLP; ``None`` means ``3 * width``."""
    mlp_type: str = "geglu"
    """``geglu``: Griffin's gated MLP (gate, up, down; tanh-approximated GeLU on the gate);
    ``swiglu``: the same with SiLU (Llama's); ``gelu``: a GeLU MLP (up, down) as in GPT-2."""
    ffn_structure: LinearStructure = field(default_factory=LinearStructure)
    """Dense or structured FFN projections (LowRank, BlockShuffle, BlockDense)."""
    moe: MoEConfig = field(default_factory=MoEConfig)
    """A mixture of experts in place of the dense FFN (off unless ``moe.num_experts`` is set)."""
    norm_type: str = "rmsnorm"
    """``rmsnorm`` or ``layernorm`` (with bias)."""
    norm_unit_offset: bool = True
    """RMSNorm's gain: ``1 + scale`` with ``scale`` initialised to zero (Griffin's and Gemma's), or,
    False, ``scale`` itself, initialised to one (Llama's)."""
    tie_embeddings: bool = True
    """The output head is the embedding's transpose; False: a head of its own (``head.weight``)."""
    proj_bias: bool = True
    """Biases on the MLP's projections and the attention's output projection (Griffin's); False as
    in Llama."""
    embed_scale: bool = True
    """Multiply embeddings by ``sqrt(width)`` rounded to bfloat16 (as the references do)."""
    logit_soft_cap: float = 30.0
    """Soft cap ``c * tanh(logits / c)``; 0 disables it."""
    norm_eps: float = 1e-6
    """Epsilon of the RMSNorms."""
    rope_fraction: float = 0.5
    """Fraction of each head's dimensions that RoPE rotates (the first ones)."""
    rope_base: float = 10000.0
    """RoPE maximum wavelength."""
    max_seq_len: int | None = None
    """Longest sequence the model is meant for (bounds generation with global attention); None: no limit."""
    qkv_bias: bool = False
    """Biases on the query, key and value projections (GPT-2 and the StructuredFFN papers' models)."""
    init: str = "griffin"
    """``griffin``: the references' fan-in scaled initialisation, structured FFN factors scaled to a
    dense layer's norm; ``gpt2``: every linear layer, gate and the embedding N(0, ``init_std``^2),
    LowRank from the SVD of such a draw and orthogonal block factors unscaled, as in the
    StructuredFFN papers' code."""
    init_std: float = 0.02
    """Standard deviation of the ``gpt2`` initialisation."""
    extra: dict[str, Any] = field(default_factory=dict, repr=False)
    """Free-form metadata (for example, where a converted checkpoint came from). Not used by the model."""

    def __post_init__(self) -> None:
        self.block_pattern = tuple(self.block_pattern)
        for name in ("logit_soft_cap", "norm_eps", "rope_fraction", "rope_base", "init_std"):
            value = getattr(self, name)
            if isinstance(value, int) and not isinstance(value, bool):
                setattr(self, name, float(value))  # JSON writes 30.0 as 30
        self.validate()

    # ----- derived sizes -------------------------------------------------------------------
    @property
    def gated_mlp(self) -> bool:
        """Whether the MLP is gated (gate, up and down projections)."""
        return self.mlp_type in GATED_MLP_TYPES

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.width // self.num_heads

    @property
    def resolved_lru_width(self) -> int:
        return self.lru_width if self.lru_width is not None else self.width

    @property
    def resolved_lru_num_blocks(self) -> int:
        return self.lru_num_blocks if self.lru_num_blocks is not None else self.num_heads

    @property
    def resolved_mlp_width(self) -> int:
        return self.mlp_width if self.mlp_width is not None else 3 * self.width

    def ffn_structure_of(self, layer: int) -> LinearStructure:
        """The linear structure of layer ``layer``'s FFN (the first may be kept dense)."""
        if layer == 0 and self.ffn_structure.keep_first_dense:
            return LinearStructure()
        return self.ffn_structure

    @property
    def resolved_expert_width(self) -> int:
        """Expanded width of each expert of a mixture-of-experts FFN."""
        return self.moe.expert_width if self.moe.expert_width is not None else self.resolved_mlp_width

    @property
    def rope_dim(self) -> int:
        """Number of rotated dimensions per head (even)."""
        return int(self.resolved_head_dim * self.rope_fraction)

    @property
    def block_types(self) -> list[str]:
        """The temporal block type of every layer."""
        pattern = self.block_pattern
        return [pattern[i % len(pattern)] for i in range(self.num_layers)]

    @property
    def has_global_attention(self) -> bool:
        """Whether some layer attends to the whole history (its decode cache grows with length)."""
        return self.attention_window is None and "attention" in self.block_pattern

    @property
    def attention_history(self) -> int | None:
        """How many previous keys a query may attend to (``None``: unbounded)."""
        if self.attention_window is None:
            return None
        return self.attention_window - (1 if self.window_semantics == "hf" else 0)

    # ----- validation ----------------------------------------------------------------------
    def validate(self) -> None:
        """Check types and shapes; raise :class:`ConfigError` naming the offending field."""
        check_types(self)

        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        for name in ("vocab_size", "width", "num_layers", "num_heads", "num_kv_heads", "conv_width"):
            need(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        for name in ("head_dim", "lru_width", "lru_num_blocks", "mlp_width", "attention_window", "max_seq_len"):
            value = getattr(self, name)
            need(value is None or value > 0, f"{name} must be positive or null, got {value}")
        need(len(self.block_pattern) > 0, "block_pattern must not be empty")
        for b in self.block_pattern:
            need(b in BLOCK_TYPES, f"block_pattern entry {b!r} is not one of {BLOCK_TYPES}")
        need(
            self.window_semantics in WINDOW_SEMANTICS,
            f"window_semantics {self.window_semantics!r} is not one of {WINDOW_SEMANTICS}",
        )
        if self.head_dim is None:
            need(
                self.width % self.num_heads == 0,
                f"width {self.width} is not divisible by num_heads {self.num_heads}; "
                "set head_dim explicitly or change one of them",
            )
        need(
            self.num_heads % self.num_kv_heads == 0,
            f"num_heads {self.num_heads} is not divisible by num_kv_heads {self.num_kv_heads}",
        )
        need(
            self.resolved_lru_width % self.resolved_lru_num_blocks == 0,
            f"lru_width {self.resolved_lru_width} is not divisible by the RG-LRU gate blocks "
            f"({self.resolved_lru_num_blocks}; set lru_num_blocks or change num_heads)",
        )
        need(0.0 <= self.rope_fraction <= 1.0, f"rope_fraction must lie in [0, 1], got {self.rope_fraction}")
        need(self.rope_dim % 2 == 0, f"rope_fraction * head_dim = {self.rope_dim} must be even")
        need(self.rope_base > 0, f"rope_base must be positive, got {self.rope_base}")
        need(self.logit_soft_cap >= 0, f"logit_soft_cap must be >= 0, got {self.logit_soft_cap}")
        need(self.norm_eps > 0, f"norm_eps must be positive, got {self.norm_eps}")
        need(self.mlp_type in MLP_TYPES, f"mlp_type {self.mlp_type!r} is not one of {MLP_TYPES}")
        need(self.norm_type in NORM_TYPES, f"norm_type {self.norm_type!r} is not one of {NORM_TYPES}")
        need(self.init in INIT_SCHEMES, f"init {self.init!r} is not one of {INIT_SCHEMES}")
        need(self.init_std > 0, f"init_std must be positive, got {self.init_std}")
        self.ffn_structure.validate()
        self.moe.validate()
        E = self.resolved_expert_width if self.moe.enabled else self.resolved_mlp_width
        self.ffn_structure.check_shape(self.width, E)
        self.ffn_structure.check_shape(E, self.width)
        if self.moe.enabled and self.moe.shared_experts:
            self.ffn_structure.check_shape(self.width, E * self.moe.shared_experts)
            self.ffn_structure.check_shape(E * self.moe.shared_experts, self.width)
        if self.window_semantics == "hf" and self.attention_window is not None:
            need(self.attention_window >= 1, "attention_window must be >= 1 with hf semantics")

    # ----- (de)serialisation ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["block_pattern"] = list(self.block_pattern)
        if not d["extra"]:
            del d["extra"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Build a config from a dict, rejecting unknown keys with a did-you-mean hint."""
        return dataclass_from_dict(cls, d, "model config")

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_json(cls, path_or_text: str | Path) -> ModelConfig:
        """Read a config from a JSON file path or a JSON string."""
        text = str(path_or_text)
        if not text.lstrip().startswith("{"):
            path = Path(path_or_text)
            if not path.exists():
                raise ConfigError(f"config file not found: {path}")
            try:
                text = read_text(path, CONFIG_BYTES, "a config file")
            except FileError as e:
                raise ConfigError(str(e)) from None
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"config is not valid JSON: {e}") from None
        return cls.from_dict(d)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def apply_overrides(
    d: dict[str, Any], overrides: list[str], expand: dict[str, Callable[[Any], Any]] | None = None
) -> dict[str, Any]:
    """A copy of config dict ``d`` with ``key.sub=value`` strings applied (``--set`` on the command
    line). Values parse as JSON, else are taken as strings; ``expand[key]`` may turn a value into
    a section (a preset name into its config, say) so that later overrides can reach inside it."""
    d = json.loads(json.dumps(d))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        *parents, leaf = key.split(".")
        node = d
        for p in parents:
            if not isinstance(node.get(p), dict):
                raise ConfigError(f"--set {key}: {p!r} is not a config section")
            node = node[p]
        if expand and key in expand:
            value = expand[key](value)
        node[leaf] = value
    return d


def dataclass_from_dict(cls: Any, d: Any, what: str) -> Any:
    """Instantiate dataclass ``cls`` from JSON-like ``d``: nested dataclasses, lists as tuples,
    unknown keys rejected with a did-you-mean hint. ``what`` names the thing in errors."""
    if not isinstance(d, dict):
        raise ConfigError(f"{what} must be a JSON object, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in d.items():
        if key not in fields:
            hint = difflib.get_close_matches(key, list(fields), n=1)
            suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ConfigError(f"unknown {what} key {key!r}{suggestion}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            value = tp.from_dict(value) if hasattr(tp, "from_dict") else dataclass_from_dict(tp, value, key)
        elif isinstance(value, list) and any(typing.get_origin(t) is tuple for t in (tp, *typing.get_args(tp))):
            value = tuple(value)  # JSON has lists: a tuple field, or an optional one, takes them
        kwargs[key] = value
    return cls(**kwargs)


def check_types(cfg: Any) -> None:
    """Raise :class:`ConfigError` for any field whose value does not match its annotation
    (JSON and ``--set`` give no guarantees)."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if not _is_instance(value, hints[f.name]):
            raise ConfigError(f"{f.name} must be of type {_type_name(hints[f.name])}, got {value!r}")
        # JSON and Python accept NaN and infinities, and NaN passes every ``<=`` check that follows
        if any(
            isinstance(v, float) and not math.isfinite(v) for v in (value if isinstance(value, tuple) else (value,))
        ):
            raise ConfigError(f"{f.name} must be a finite number, got {value!r}")


def _is_instance(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_is_instance(value, t) for t in typing.get_args(tp))
    if origin is Literal:
        return value in typing.get_args(tp)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_is_instance(v, args[0]) for v in value)
        return len(value) == len(args) and all(_is_instance(v, a) for v, a in zip(value, args, strict=True))
    if origin is dict:
        return isinstance(value, dict)
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
