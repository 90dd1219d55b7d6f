"""What a run optimises: the one interface through which the training loop reaches an objective.

An objective gives the loss of a batch (and the statistics to log with it) and the evaluation on
validation batches; the loop knows nothing else of it. :class:`NextToken` is pretraining's and
SFT's (next-token cross-entropy on every token, or on the tokens a batch marks as targets);
:class:`griffon.align.preference.PreferenceObjective` is DPO's and QRPO's. What an objective
stores with the run (the reference log-probabilities of DPO and QRPO) it writes when it is made.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Protocol

import torch
from torch import nn

from griffon.eval.score import evaluate
from griffon.train.losses import goldfish_mask, next_token_loss


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
