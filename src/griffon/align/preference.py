"""What DPO and QRPO share: offline alignment on completions scored against a reference policy.

An objective of this kind (:class:`PreferenceObjective`; :mod:`griffon.align.dpo`,
:mod:`griffon.align.qrpo`) reads JSONL examples, each a prompt and one or more completions (DPO's
``chosen`` and ``rejected``, QRPO's ``completion`` with its rewards). Each completion is one row:
the prompt's tokens then the completion's (and the tokenizer's EOS where it has one), the
completion's tokens marked as the ones whose log-probabilities sum to the sequence's
``log pi(y|x)``.

The reference policy's log-probabilities are computed once, from the model the run starts from,
before its first step (:func:`reference_logps`), and stored with the run
(``reference_logps.safetensors``), so training holds one model and a resume reads them back.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from griffon.align.examples import (
    check_learnable,
    example_warnings,
    examples_tokenizer,
    first_target,
    read_objects,
    split_examples,
)
from griffon.data.loader import ShuffledLoader, eval_batch_count, eval_batches
from griffon.data.sources import DataError
from griffon.data.tokenizers import Tokenizer


class PreferenceObjective:
    """An offline alignment objective: what its examples hold (``completions``, checked by
    :meth:`check_example`, with the numbers its loss reads, :meth:`example_values`) and its loss on
    the sequence log-probabilities of a batch's rows (:meth:`batch_loss`). The training loop's
    objective (:class:`griffon.train.objective.Objective`) for :class:`PreferenceData`."""

    name: ClassVar[str]
    completions: ClassVar[tuple[str, ...]]
    """An example's completions, one row each, in this order."""

    @classmethod
    def check_example(cls, where: str, ex: dict) -> None:
        """Refuse (:class:`DataError` naming ``where``) an example this objective cannot learn from,
        beyond its texts (checked for every objective)."""

    @classmethod
    def example_values(cls, ex: dict) -> dict[str, float]:
        """The numbers of an example that the loss reads (QRPO's quantile reward)."""
        return {}

    @classmethod
    def example_need(cls, rows: list[list[int]], firsts: list[int | None]) -> int | None:
        """The smallest ``seq_len`` at which an example has something to learn, from its rows'
        tokens and each row's :func:`~griffon.align.examples.first_target` (None: at none)."""
        return None if any(f is None for f in firsts) else max(firsts)

    def __init__(self, data: PreferenceData, reference: dict[str, torch.Tensor], beta: float) -> None:
        self.data, self.reference, self.beta = data, reference, beta

    def batch_loss(
        self, logps: torch.Tensor, ref: torch.Tensor, values: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of a batch from its rows' policy and reference log-probabilities, (rows,) in the
        order of :meth:`completions`, and the examples' :meth:`example_values`, (examples,) float64;
        and the statistics to log."""
        raise NotImplementedError

    def _loss(self, model: nn.Module, batch: tuple, split: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        tokens, seg, targets, index = batch
        rows = self.data.train if split == "train" else self.data.val
        logps = sequence_logps(model, tokens, seg, targets)
        ref = self.reference[split][index.cpu()].to(logps.device, logps.dtype)
        examples = index.cpu().numpy()[:: rows.per_example] // rows.per_example
        values = {k: torch.from_numpy(v[examples]).to(logps.device) for k, v in rows.values.items()}  # float64
        loss, stats = self.batch_loss(logps, ref, values)
        # the mean of log pi_ref - log pi over the batch's completions: an estimate of
        # KL(pi_ref || pi) where they are the reference policy's samples (QRPO's offline setting)
        return loss, {"kl_ref": (ref - logps).detach().mean()} | stats

    def loss(self, model: nn.Module, batch: tuple) -> tuple[torch.Tensor, dict[str, float]]:
        loss, stats = self._loss(model, batch, "train")
        return loss, {k: float(v) for k, v in stats.items()}

    @torch.no_grad()
    def evaluate(self, model, batches, device, autocast, reduce) -> dict[str, float]:
        """The loss and statistics over validation ``batches``, means over their rows (and ranks)."""
        was_training = model.training
        model.eval()
        sums: dict[str, float] = {}
        rows = 0
        for batch in batches:
            batch = tuple(t.to(device) for t in batch)
            with autocast():
                loss, stats = self._loss(model, batch, "val")
            for key, value in {"loss": loss, **stats}.items():
                sums[key] = sums.get(key, 0.0) + float(value) * len(batch[3])
            rows += len(batch[3])
        model.train(was_training)
        means = reduce(torch.tensor([v / rows for v in sums.values()], dtype=torch.float64, device=device))
        return {f"val_{key}": float(v) for key, v in zip(sums, means, strict=True)}


def read_preference_examples(path: str | Path, objective: type[PreferenceObjective]) -> list[dict]:
    """The examples of ``objective``'s JSONL file, each checked; :class:`DataError` naming the file and line."""
    out = []
    for where, ex in read_objects(path):
        for key in ("prompt", *objective.completions):
            if not isinstance(ex.get(key), str):
                raise DataError(f"{where}: {key!r} must be a string")
            if key != "prompt" and not ex[key]:
                raise DataError(f"{where}: {key!r} is empty")
        objective.check_example(where, ex)
        out.append(ex)
    if not out:
        raise DataError(f"{path} holds no examples")
    return out


def real_value(x) -> float | None:
    """``x`` as a finite float if it is a real number of any type (int, float, numpy's,
    ``fractions.Fraction``), else None: a bool, a non-number, NaN, an infinity, or a value too
    large for a float."""
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        return None
    try:
        value = float(x)
    except (OverflowError, ValueError):
        return None
    return value if math.isfinite(value) else None


@dataclass
class PreferenceRows:
    """One completion a row: tokens, segment positions and the completion's tokens marked, each
    (rows, seq_len + 1); example i is rows ``per_example * i`` onwards, one per completion."""

    per_example: int
    tokens: np.ndarray
    segment_pos: np.ndarray
    targets: np.ndarray
    values: dict[str, np.ndarray]
    """Each example's :meth:`PreferenceObjective.example_values`, (examples,) float64 each."""
    truncated: int
    needs: list[int | None]
    """Each example's smallest ``seq_len`` at which it has something to learn
    (:meth:`PreferenceObjective.example_need`)."""

    @property
    def n_examples(self) -> int:
        return len(self.tokens) // self.per_example


def build_rows(
    examples: list[dict], objective: type[PreferenceObjective], tokenizer: Tokenizer, seq_len: int
) -> PreferenceRows:
    """The rows of ``examples``, one a completion, and the values their loss reads."""
    width, k = seq_len + 1, len(objective.completions)
    eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    n = len(examples) * k
    tokens = np.zeros((n, width), dtype=np.int64)
    targets = np.zeros((n, width), dtype=bool)
    truncated = 0
    needs: list[int | None] = []
    for e, ex in enumerate(examples):
        prompt = tokenizer.encode(ex["prompt"])
        rows, firsts = [], []
        for j, key in enumerate(objective.completions):
            completion = tokenizer.encode(ex[key]) + eos
            i, ids = e * k + j, (prompt + completion)[:width]
            truncated += len(prompt) + len(completion) > width
            tokens[i, : len(ids)] = ids
            targets[i, len(prompt) : len(ids)] = True
            targets[i, 0] = False  # nothing predicts a row's first token
            rows.append(prompt + completion)
            firsts.append(first_target([False] * len(prompt) + [True] * len(completion)))
        needs.append(objective.example_need(rows, firsts))
    seg = np.broadcast_to(np.arange(width), (n, width)).copy()
    values = [objective.example_values(ex) for ex in examples]
    columns = {key: np.array([v[key] for v in values], dtype=np.float64) for key in (values[0] if values else {})}
    return PreferenceRows(k, tokens, seg, targets, columns, truncated, needs)


def sequence_logps(model: nn.Module, tokens: torch.Tensor, seg: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(rows,) ``log pi(completion | prompt)``: the marked tokens' log-probabilities summed (float32)."""
    logits, _ = model(tokens[:, :-1], seg[:, :-1])  # (B, T, V)
    token_logps = -F.cross_entropy(logits.float().transpose(1, 2), tokens[:, 1:], reduction="none")  # (B, T)
    return (token_logps * targets[:, 1:]).sum(dim=1)


@torch.no_grad()
def reference_logps(model: nn.Module, rows: PreferenceRows, device: torch.device, batch_size: int) -> torch.Tensor:
    """(rows,) float64: the sequence log-probabilities of ``rows`` under ``model`` (eval mode)."""
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(rows.tokens), batch_size):
        s = slice(start, start + batch_size)
        t, g, m = (torch.from_numpy(a[s]).to(device) for a in (rows.tokens, rows.segment_pos, rows.targets))
        out.append(sequence_logps(model, t, g, m).double().cpu())
    model.train(was_training)
    return torch.cat(out)


class PreferenceLoader(ShuffledLoader):
    """Yields ``(tokens, segment_pos, targets, rows)`` for ``batch_size`` examples of this rank
    (each its ``per_example`` rows), ``rows`` the row indices (for the reference
    log-probabilities)."""

    def __init__(self, rows: PreferenceRows, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        super().__init__(rows.n_examples, partial(batch_of, rows), batch_size, seed, rank, world_size,
                         unit="examples")  # fmt: skip


def batch_of(rows: PreferenceRows, examples: np.ndarray) -> tuple[torch.Tensor, ...]:
    """The rows of ``examples`` (each example's next to each other) and their indices."""
    k = rows.per_example
    index = (examples[:, None] * k + np.arange(k)).reshape(-1)
    return (
        *(torch.from_numpy(a[index]) for a in (rows.tokens, rows.segment_pos, rows.targets)),
        torch.from_numpy(index),
    )


@dataclass
class PreferenceData:
    """A run's data for an offline alignment objective, read, checked and tokenized before
    anything is written."""

    objective: type[PreferenceObjective]
    tokenizer: Tokenizer
    train: PreferenceRows
    val: PreferenceRows
    unlearnable: int = 0
    """Examples with nothing to learn within ``seq_len`` (a few are trained on for nothing)."""

    @classmethod
    def open(cls, objective: type[PreferenceObjective], path: str | None, tokenizer_spec: str, seq_len: int,
             val_fraction: float, seed: int, vocab_size: int) -> PreferenceData:  # fmt: skip
        tokenizer = examples_tokenizer(objective.name, path, tokenizer_spec, vocab_size)
        train, val = split_examples(read_preference_examples(path, objective), val_fraction, seed)
        rows = [build_rows(split, objective, tokenizer, seq_len) for split in (train, val)]
        unlearnable = check_learnable(rows[0].needs, rows[1].needs, seq_len, "examples")
        return cls(objective, tokenizer, *rows, unlearnable)

    def prepare(self) -> None:
        """Nothing to write: the examples were read and tokenized by :meth:`open`."""

    def warnings(self) -> list[str]:
        seq_len = self.train.tokens.shape[1] - 1
        return example_warnings((self.train.truncated, self.val.truncated), self.unlearnable, seq_len)

    def loader(self, batch_size: int, seed: int, rank: int, world_size: int) -> PreferenceLoader:
        return PreferenceLoader(self.train, batch_size, seed, rank, world_size)

    def eval_batches(self, batch_size: int, max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, ...]]:
        return eval_batches(self.val.n_examples, partial(batch_of, self.val), batch_size, max_batches)

    def eval_batch_count(self, batch_size: int, max_batches: int | None = None) -> int:
        return eval_batch_count(self.val.n_examples, batch_size, max_batches)

    def reference(self, model: nn.Module, path: Path, device: torch.device, batch_size: int,
                  write: bool) -> dict[str, torch.Tensor]:  # fmt: skip
        """The reference log-probabilities of both splits: read from ``path`` if a start of this
        run stored them (a resume), else computed with ``model`` (the initial one) and, with
        ``write``, stored there atomically."""
        from safetensors.torch import load_file

        from griffon.checkpoint import save_state_dict

        sizes = {"train": len(self.train.tokens), "val": len(self.val.tokens)}
        if path.is_file():
            stored = load_file(str(path))
            if {k: len(v) for k, v in stored.items()} != sizes:
                raise DataError(f"{path} does not hold this run's reference log-probabilities; remove it")
            return stored
        ref = {name: reference_logps(model, rows, device, batch_size) for name, rows in
               (("train", self.train), ("val", self.val))}  # fmt: skip
        if write:
            save_state_dict(ref, path)
        return ref
