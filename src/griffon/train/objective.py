"""What a run optimises: the interfaces through which the training loop reaches an objective and its
data, and the registry of objectives (``objective=NAME``).

The loop knows an objective (:class:`Objective`) by the loss of a batch (and the statistics to log
with it) and the evaluation on validation batches, and the run's data (:class:`RunData`) by its
loaders; it names neither. :data:`OBJECTIVES` says, for each name, how a run opens its data and
builds its objective, as torchtitan hands its trainer a loss function: a new objective is a module
(its data and loss) and a line here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

from griffon.align.dpo import DPO
from griffon.align.preference import PreferenceData, PreferenceObjective
from griffon.align.qrpo import QRPO
from griffon.align.sft import SFTData
from griffon.config import ConfigError
from griffon.data.tokenizers import Tokenizer
from griffon.data.training_data import PackedData
from griffon.distill.objectives import AttentionTransfer, Distillation, check_distillation, freeze, open_teacher
from griffon.distill.student import copied_names
from griffon.eval.score import byte_table, evaluate
from griffon.model import Griffon
from griffon.train.losses import goldfish_mask, next_token_loss

if TYPE_CHECKING:
    from griffon.run import Run
    from griffon.train.config import TrainConfig


class Objective(Protocol):
    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, dict[str, float]]:
        """The mean loss of ``batch`` (on the model's device) and the statistics to log with the step."""
        ...

    def evaluate(
        self,
        model: nn.Module,
        batches: Iterable[tuple[torch.Tensor, ...]],
        device: torch.device,
        autocast: Callable[[], contextlib.AbstractContextManager],
        reduce: Callable[[torch.Tensor], torch.Tensor],
    ) -> dict[str, float]:
        """The validation figures over ``batches`` (``val_loss`` and the rest), reduced over ranks."""
        ...


class Loader(Protocol):
    """Training batches for one rank, endlessly, epoch after epoch; its position is a dict."""

    steps_per_epoch: int

    def __next__(self) -> tuple[torch.Tensor, ...]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class RunData(Protocol):
    """A run's data as the loop reads it: opened and checked before anything is written
    (:attr:`ObjectiveSpec.open_data`), then :meth:`prepare`\\ d by one process (the others wait)."""

    def prepare(self) -> None:
        """Write what the data needs written into the run (raw text's prepared tokens)."""
        ...

    @property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer of the data's ids, saved with the run (read after :meth:`prepare`)."""
        ...

    def warnings(self) -> list[str]:
        """What the run is told of its data (examples cut, or with nothing to learn)."""
        ...

    def loader(self, batch_size: int, seed: int, rank: int, world_size: int) -> Loader: ...

    def eval_batches(self, batch_size: int, max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, ...]]:
        """Validation batches: all of them, or ``max_batches``."""
        ...

    def eval_batch_count(self, batch_size: int, max_batches: int | None = None) -> int:
        """How many batches :meth:`eval_batches` yields."""
        ...


@dataclass(frozen=True)
class Start:
    """What an objective is built from, besides the config and the data: the model as the run
    starts (its initial weights loaded), the run, the device, and whether this process writes."""

    model: nn.Module
    run: Run
    device: torch.device
    is_main: bool


@dataclass(frozen=True)
class ObjectiveSpec:
    """How a run with an objective reads its data and what it optimises."""

    open_data: Callable[[TrainConfig, Run], RunData]
    """Read and check ``data.path`` for the run; nothing is written."""
    build: Callable[[TrainConfig, RunData, Start], Objective]
    needs_init: str | None = None
    """Why a run with this objective must start from a trained model (``--init``); None: it need not."""
    renders_chats: bool = False
    """Its data are chats rendered with the chat template, whose default then travels with the run."""
    check: Callable[[TrainConfig], None] | None = None
    """Refuse (:class:`~griffon.config.ConfigError`) a config this objective cannot train with."""


class NextToken:
    """Next-token cross-entropy: on every target of ``(tokens, segment_pos)`` batches, or on those
    marked in ``(tokens, segment_pos, targets)`` (SFT), less the Goldfish loss's dropped ones."""

    def __init__(self, token_bytes: torch.Tensor, goldfish_k: int = 0, goldfish_h: int = 13) -> None:
        self.token_bytes, self.goldfish_k, self.goldfish_h = token_bytes, goldfish_k, goldfish_h

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, dict[str, float]]:
        tokens, seg, *marked = batch
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        mask = marked[0][:, 1:] if marked else None
        if self.goldfish_k:
            dropped = goldfish_mask(inputs, self.goldfish_k, self.goldfish_h)
            mask = dropped if mask is None else mask & dropped
        logits, _ = model(inputs, seg[:, :-1])
        return next_token_loss(logits, targets, mask)[0], {}

    def evaluate(self, model, batches, device, autocast, reduce) -> dict[str, float]:
        return evaluate(model, batches, self.token_bytes, device, autocast, reduce)


def _next_token(cfg: TrainConfig, data: RunData, start: Start) -> NextToken:
    return NextToken(byte_table(data.tokenizer), cfg.goldfish_k, cfg.goldfish_h)


def _packed(cfg: TrainConfig, run: Run) -> PackedData:
    d = cfg.data
    return PackedData.open(d.path, run.data, d.tokenizer, d.seq_len, d.val_fraction, d.verify, cfg.model.vocab_size)


def _sft(cfg: TrainConfig, run: Run) -> SFTData:
    d = cfg.data
    return SFTData.open(d.path, d.tokenizer, d.chat_template, d.seq_len, d.val_fraction, cfg.seed, cfg.model.vocab_size)


def _offline_alignment(objective: type[PreferenceObjective]) -> ObjectiveSpec:
    """The spec of an offline alignment objective (:mod:`griffon.align.preference`): its reference
    policy is the model the run starts from, its log-probabilities computed once and stored with
    the run."""

    def open_data(cfg: TrainConfig, run: Run) -> PreferenceData:
        d = cfg.data
        return PreferenceData.open(objective, d.path, d.tokenizer, d.seq_len, d.val_fraction, cfg.seed,
                                   cfg.model.vocab_size)  # fmt: skip

    def build(cfg: TrainConfig, data: PreferenceData, start: Start) -> PreferenceObjective:
        path: Path = start.run.reference_logps
        reference = data.reference(start.model, path, start.device, cfg.data.batch_size, write=start.is_main)
        return objective(data, reference, cfg.beta)

    return ObjectiveSpec(open_data, build, needs_init="aligns a trained model against itself")


def _distill_check(stage: str) -> Callable[[TrainConfig], None]:
    def check(cfg: TrainConfig) -> None:
        if cfg.distill.teacher is None:
            raise ConfigError(f"objective={cfg.objective} distils a teacher: set distill.teacher (griffon distill)")
        if stage == "align" and (cfg.distributed != "none" or cfg.lora.rank or cfg.self_guided.enabled):
            raise ConfigError("objective=distill_align trains in one process, without LoRA or self-guided training")

    return check


def _distill_data(cfg: TrainConfig, run: Run) -> PackedData:
    """A corpus as pretraining reads it, after the teacher, the student and the tokenizer are checked."""
    check_distillation(cfg.distill.teacher, cfg.model, cfg.distill.init, cfg.data.tokenizer)
    return _packed(cfg, run)


def _teacher(cfg: TrainConfig, start: Start) -> Griffon:
    # a run with --init starts from it (stage 1's student); else from the teacher
    return open_teacher(cfg.distill.teacher, start.model, cfg.distill.init, start_from_teacher=cfg.init is None)


def _attention_transfer(cfg: TrainConfig, data: RunData, start: Start) -> AttentionTransfer:
    return AttentionTransfer(start.model, _teacher(cfg, start))


def _distillation(cfg: TrainConfig, data: RunData, start: Start) -> Distillation:
    teacher = _teacher(cfg, start)
    if cfg.distill.freeze_copied:
        freeze(start.model, copied_names(start.model.config))
    d = cfg.distill
    return Distillation(teacher, byte_table(data.tokenizer), d.temperature, d.top_k, d.ce_weight)


OBJECTIVES: dict[str, ObjectiveSpec] = {
    "lm": ObjectiveSpec(_packed, _next_token),
    "sft": ObjectiveSpec(_sft, _next_token, renders_chats=True),
    "dpo": _offline_alignment(DPO),
    "qrpo": _offline_alignment(QRPO),
    "distill_align": ObjectiveSpec(_distill_data, _attention_transfer, check=_distill_check("align")),
    "distill": ObjectiveSpec(_distill_data, _distillation, check=_distill_check("distill")),
}
"""Every objective a run can train with, by the name ``objective`` takes."""
