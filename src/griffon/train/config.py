"""Training configuration: nested typed dataclasses, JSON round trip, ``--set key=value`` overrides."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from griffon.config import ConfigError, ModelConfig, check_types, dataclass_from_dict
from griffon.config import apply_overrides as config_overrides
from griffon.files import CONFIG_BYTES, FileError, read_text
from griffon.presets import get_preset
from griffon.train.objective import OBJECTIVES

SCHEDULES = ("cosine", "wsd", "constant")
DECAY_SCOPES = ("matrices", "all")
DTYPES = ("auto", "fp32", "bf16")
DISTRIBUTED = ("none", "ddp", "fsdp")
GUIDE_MODES = ("fixed_steps", "fixed_flops")
DISTILL_INITS = ("attention", "random")


def _default_model() -> ModelConfig:
    return get_preset("griffin-demo")


@dataclass
class DataConfig:
    path: str | None = None
    """A prepared data directory (``griffon data prepare``), or a raw corpus (a .txt, .jsonl[.gz] or
    .parquet file, or a directory of text files) that the run prepares into ``RUN/data``;
    ``None``: the embedded Shakespeare corpus, prepared the same way."""
    tokenizer: str = "bytes"
    """Tokenizer a raw corpus is prepared with: ``bytes``, a tokenizer.json or .model file, or
    ``bpe-N``: a byte-level BPE of N tokens trained on the corpus's training documents."""
    val_fraction: float = 0.1
    """Share of documents held out for validation when preparing a raw corpus."""
    seq_len: int = 256
    """Tokens per training sequence."""
    batch_size: int = 8
    """Sequences per micro-batch on each rank."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    verify: bool = True
    """Check the token shards against the SHA-256 sums in ``meta.json`` when a run starts."""
    chat_template: str | None = None
    """``objective=sft``: a Jinja chat template file for the chats (default: the tokenizer's,
    :func:`griffon.align.chat.template_for`)."""

    def validate(self) -> None:
        check_types(self)
        for name in ("seq_len", "batch_size", "grad_accum"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"data.{name} must be positive, got {getattr(self, name)}")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"data.val_fraction must lie in (0, 1), got {self.val_fraction}")


@dataclass
class OptimConfig:
    lr: float = 4e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of ``lr`` (cosine and WSD)."""
    weight_decay: float = 0.1
    """AdamW decay (see ``decay``)."""
    decay: str = "matrices"
    """``matrices``: decay weight matrices only (not norms, biases, embeddings or ``a_param``);
    ``all``: every parameter, as the StructuredFFN papers' code does (one AdamW group)."""
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    schedule: str = "cosine"
    """``cosine`` (warmup then cosine), ``wsd`` (warmup, stable, linear decay) or ``constant``."""
    warmup_steps: int = 30
    warmup_fraction: float | None = None
    """Warm up over this fraction of the planned steps instead of ``warmup_steps`` (0.1 in the
    StructuredFFN papers)."""
    decay_fraction: float = 0.2
    """WSD: the final fraction of steps over which the rate decays."""
    grad_clip: float | None = 1.0
    """Clip the global gradient norm to this value; ``None`` disables it."""
    agc: float | None = None
    """Adaptive gradient clipping (NFNets) threshold lambda, e.g. 0.04; ``None`` disables it."""

    def validate(self) -> None:
        check_types(self)
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"optim.schedule {self.schedule!r} is not one of {SCHEDULES}")
        if self.lr <= 0:
            raise ConfigError(f"optim.lr must be positive, got {self.lr}")
        if self.decay not in DECAY_SCOPES:
            raise ConfigError(f"optim.decay {self.decay!r} is not one of {DECAY_SCOPES}")
        if self.warmup_fraction is not None and not 0 <= self.warmup_fraction < 1:
            raise ConfigError(f"optim.warmup_fraction must lie in [0, 1), got {self.warmup_fraction}")


@dataclass
class SelfGuidedConfig:
    """Self-guided training of a structured FFN (:mod:`griffon.train.self_guided`)."""

    enabled: bool = False
    fraction: float = 0.5
    """Share of the optimizer steps (of the dense run's, in ``fixed_flops`` mode) that are guided."""
    mode: str = "fixed_steps"
    """``fixed_steps``: same steps as without guidance (it costs extra FLOPs); ``fixed_flops``:
    as many extra unguided steps as make the run spend the dense-FFN model's FLOPs."""
    reduce_flop: bool = False
    """Run the dense branch only with probability equal to its coefficient (one draw per step)."""
    extra_steps_data: str = "continue"
    """``fixed_flops``: what the steps beyond the dense run's read. ``continue``: the data that
    follows; ``reread``: the run's data again from its start (the guided phase's batches), as
    the StructuredFFN papers' code does."""

    def validate(self) -> None:
        check_types(self)
        if not 0 < self.fraction <= 1:
            raise ConfigError(f"self_guided.fraction must lie in (0, 1], got {self.fraction}")
        if self.mode not in GUIDE_MODES:
            raise ConfigError(f"self_guided.mode {self.mode!r} is not one of {GUIDE_MODES}")
        if self.extra_steps_data not in ("continue", "reread"):
            raise ConfigError(f"self_guided.extra_steps_data {self.extra_steps_data!r} is not continue or reread")
        if self.extra_steps_data == "reread" and self.mode != "fixed_flops":
            raise ConfigError("self_guided.extra_steps_data=reread needs self_guided.mode=fixed_flops")


@dataclass
class LoraConfig:
    """LoRA fine-tuning through peft (:mod:`griffon.checkpoint.adapters`): adapters on the linears named in
    ``targets``, every other weight frozen. ``rank`` 0: off (every weight trains)."""

    rank: int = 0
    alpha: float = 16.0
    """The update is scaled by ``alpha / rank``."""
    dropout: float = 0.0
    """Dropout on the adapters' input."""
    targets: tuple[str, ...] | None = None
    """Linear layers to adapt, by module name (the last part of its dotted path); each must be in
    the model. None: those of :data:`griffon.checkpoint.adapters.DEFAULT_LORA_TARGETS` the model has (a Hawk
    has no attention)."""

    def validate(self) -> None:
        check_types(self)
        if self.rank < 0:
            raise ConfigError(f"lora.rank must be >= 0 (0: off), got {self.rank}")
        if self.alpha <= 0:
            raise ConfigError(f"lora.alpha must be positive, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"lora.dropout must lie in [0, 1), got {self.dropout}")
        if self.targets is not None and not self.targets:
            raise ConfigError("lora.targets is empty: name the linear layers to adapt (or null for the default)")


@dataclass
class DistillConfig:
    """Distillation from a teacher (``objective=distill_align`` or ``distill``, :mod:`griffon.distill`)."""

    teacher: str | None = None
    """The teacher: any model path (a run, a checkpoint, an HF Llama-family directory)."""
    init: str = "attention"
    """How a new recurrent block starts: ``attention``, from the weights of the attention layer it
    replaces, or ``random`` (:mod:`griffon.distill.student`). Only when the run starts from the
    teacher (no ``--init``)."""
    temperature: float = 1.0
    top_k: int | None = None
    """The KL over the teacher's ``top_k`` likeliest tokens only (its probabilities renormalised)."""
    ce_weight: float = 0.0
    """Plus this times the cross-entropy on the data."""
    freeze_copied: bool = True
    """``objective=distill``: what was copied from the teacher (embeddings, head, norms, MLPs, kept
    attention) stays frozen; False: it trains too (or, with ``lora.rank``, is LoRA-adapted)."""

    def validate(self) -> None:
        check_types(self)
        if self.init not in DISTILL_INITS:
            raise ConfigError(f"distill.init {self.init!r} is not one of {DISTILL_INITS}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ConfigError(f"distill.temperature must be positive, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"distill.top_k must be >= 1 (or null: every token), got {self.top_k}")
        if not (math.isfinite(self.ce_weight) and self.ce_weight >= 0):
            raise ConfigError(f"distill.ce_weight must be >= 0, got {self.ce_weight}")


@dataclass
class TrainConfig:
    """Everything a run needs; saved as ``config.json`` in the run directory."""

    model: ModelConfig = field(default_factory=_default_model)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    self_guided: SelfGuidedConfig = field(default_factory=SelfGuidedConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    objective: str = "lm"
    """One of :data:`griffon.train.objective.OBJECTIVES`. ``lm``: next-token prediction on every
    token of a corpus; ``sft``: on the completions or assistant turns of a JSONL of examples
    (``data.path``, :mod:`griffon.align.sft`); ``dpo``, ``qrpo``: offline alignment on preference
    pairs or rewarded completions (:mod:`griffon.align.dpo`, :mod:`griffon.align.qrpo`), against
    the model the run starts from."""
    beta: float = 0.1
    """DPO's and QRPO's KL regularisation strength."""
    init: str | None = None
    """The model the run starts from (``griffon train --init SRC``, :mod:`griffon.train.init`), by
    its absolute path: its weights at step 0; its model config and tokenizer are the run's. None:
    random weights."""
    init_given: str | None = None
    """``--init`` as it was given (``init`` is where it resolved to)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps."""
    max_tokens: int | None = None
    """Stop once this many training tokens (all ranks) have been consumed."""
    max_flops: float | None = None
    """Stop once the model's training FLOPs (``griffon.accounting``) reach this budget."""
    max_minutes: float | None = 8.0
    """Stop after this much wall time (not bitwise reproducible; set null for exact runs)."""
    replan_tokens: bool = False
    """``max_tokens`` is a plan made from ``max_minutes`` before the run (``model=auto`` sets this):
    once, after a tenth of the time, re-plan it from the pace measured since warmup so the run fills
    its time; the new ``max_tokens`` and ``replanned_at`` are saved in ``config.json`` and this set
    false, so a resume replays the same schedule."""
    replanned_at: tuple[int, int] | None = None
    """``[step, steps]``: where the re-plan happened and the schedule's length before it; the steps
    before it keep that schedule's learning rates."""
    dtype: str = "auto"
    """``bf16`` autocast (recurrence state and softmax stay float32), ``fp32``, or ``auto``: bf16 on
    GPUs and on CPUs with native bf16 matmuls (AVX512-BF16/AMX), fp32 elsewhere."""
    device: str = "auto"
    compile: bool = False
    activation_checkpointing: bool = False
    goldfish_k: int = 0
    """Goldfish loss: drop 1/k of the tokens from the loss (0 disables it)."""
    goldfish_h: int = 13
    """Goldfish loss: tokens hashed to decide which ones to drop."""
    distributed: str = "none"
    """``none``, ``ddp`` or ``fsdp`` (FSDP2 ``fully_shard``); run under torchrun for the last two."""
    eval_every: int = 100
    eval_batches: int | None = 20
    """Validation batches per periodic evaluation (spread over the split); ``None``: the whole split."""
    final_eval_batches: int | None = None
    """Validation batches of the evaluation at the end of the run; ``None``: the whole split."""
    log_every: int = 10
    save_every: int = 100
    keep_checkpoints: int = 2
    max_bad_steps: int = 5
    """Stop after this many consecutive steps with a non-finite loss or gradient."""
    max_weight_abs: float | None = 1e4
    """Refuse to save a checkpoint holding a weight larger in magnitude than this, and stop: the
    weights have exploded (a finite step can do that). ``None`` checks finiteness only."""
    seed: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        check_types(self)
        self.model.validate()
        self.data.validate()
        self.optim.validate()
        self.self_guided.validate()
        self.lora.validate()
        self.distill.validate()
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"objective {self.objective!r} is not one of {tuple(OBJECTIVES)}")
        if self.beta <= 0:
            raise ConfigError(f"beta must be positive, got {self.beta}")
        spec = OBJECTIVES[self.objective]
        if spec.needs_init is not None and self.init is None:
            raise ConfigError(f"objective={self.objective} {spec.needs_init}: start with --init SRC")
        if spec.check is not None:
            spec.check(self)
        if self.lora.rank:
            if self.init is None:
                raise ConfigError("lora.rank adapts a trained model: start the run with --init SRC")
            if self.self_guided.enabled or self.distributed == "fsdp":
                raise ConfigError("LoRA runs with distributed=none or ddp and without self-guided training")
        if self.self_guided.enabled:
            if not self.model.ffn_structure.is_structured():
                raise ConfigError("self_guided.enabled needs a structured FFN: set model.ffn_structure.kind")
            if self.distributed == "fsdp":
                raise ConfigError("self-guided training supports distributed=none or ddp, not fsdp yet")
            if self.model.moe.enabled:
                raise ConfigError("self-guided training guides a dense FFN's projections, not a mixture of experts")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype {self.dtype!r} is not one of {DTYPES}")
        if self.distributed not in DISTRIBUTED:
            raise ConfigError(f"distributed {self.distributed!r} is not one of {DISTRIBUTED}")
        if not (self.max_steps or self.max_tokens or self.max_flops or self.max_minutes):
            raise ConfigError("set at least one budget: max_steps, max_tokens, max_flops or max_minutes")
        for name in ("max_steps", "max_tokens", "max_flops", "max_minutes"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{name} must be a positive number (or null), got {value}")
        if self.replanned_at is not None and not (
            len(self.replanned_at) == 2 and all(isinstance(v, int) and v > 0 for v in self.replanned_at)
        ):
            raise ConfigError(f"replanned_at must be (step, steps), two positive integers, got {self.replanned_at}")
        if self.replan_tokens:
            if not (self.max_tokens and self.max_minutes):
                raise ConfigError("replan_tokens re-plans max_tokens from max_minutes: set both")
            if self.optim.warmup_fraction is not None or self.optim.warmup_steps < 10 or self.self_guided.enabled:
                raise ConfigError(
                    "replan_tokens re-plans at the end of warmup: it needs optim.warmup_steps >= 10, no "
                    "optim.warmup_fraction and no self-guided training (whose steps are planned up front)"
                )
        for name in ("eval_every", "log_every", "save_every", "keep_checkpoints", "max_bad_steps"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_weight_abs is not None and self.max_weight_abs <= 0:
            raise ConfigError(f"max_weight_abs must be positive, got {self.max_weight_abs}")
        if self.goldfish_k < 0 or self.goldfish_k == 1:
            raise ConfigError(f"goldfish_k must be 0 (off) or >= 2, got {self.goldfish_k}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["model"] = self.model.to_dict()
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        if not isinstance(d, dict):
            raise ConfigError(f"a train config must be a JSON object, got {type(d).__name__}")
        d = dict(d)
        if d.get("model") == "auto":
            raise ConfigError(
                "model=auto is chosen when a run starts: use `griffon train`, or griffon.scaling.auto.plan"
            )
        if isinstance(d.get("model"), str):  # a preset name
            d["model"] = get_preset(d["model"]).to_dict()
        return dataclass_from_dict(cls, d, "train config")

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file not found: {path}")
        try:
            text = read_text(path, CONFIG_BYTES, "a config file")
        except FileError as e:
            raise ConfigError(str(e)) from None
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None


# What ``griffon train --resume RUN --set ...`` may change: budgets, the learning rate and
# clipping (to continue a run that diverged), and bookkeeping. The model, data and batch shape
# define what the checkpoint means and stay as they were.
RESUME_OVERRIDES = (
    "max_steps", "max_tokens", "max_flops", "max_minutes", "optim.lr", "optim.min_lr_ratio", "optim.grad_clip",
    "optim.agc", "eval_every", "eval_batches", "final_eval_batches", "log_every", "save_every", "keep_checkpoints",
    "max_bad_steps", "max_weight_abs", "data.verify",
)  # fmt: skip


def apply_resume_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """``cfg`` with ``key=value`` overrides, each of a key in :data:`RESUME_OVERRIDES`."""
    for item in overrides:
        key = item.split("=", 1)[0]
        if key not in RESUME_OVERRIDES:
            raise ConfigError(
                f"--set {key} cannot change when resuming a run; these can: {', '.join(RESUME_OVERRIDES)}"
            )
    return TrainConfig.from_dict(apply_overrides(cfg.to_dict(), overrides))


def apply_overrides(d: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """A train-config dict with ``key.sub=value`` overrides (:func:`griffon.config.apply_overrides`);
    ``model=PRESET`` swaps in a preset's model config, which later overrides may then change."""
    return config_overrides(d, overrides, expand={"model": _preset_dict})


def _preset_dict(value: Any) -> Any:
    """A preset's model config; ``auto`` stays a name, resolved by :mod:`griffon.scaling.auto`."""
    return get_preset(value).to_dict() if isinstance(value, str) and value != "auto" else value
