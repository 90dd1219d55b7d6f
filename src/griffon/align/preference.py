"""Offline alignment data and losses: ``objective=dpo`` and ``objective=qrpo``.

DPO reads ``{"prompt", "chosen", "rejected"}`` lines, QRPO ``{"prompt", "completion", "reward",
"ref_rewards": [...]}`` (``ref_rewards``: the rewards of the reference policy's completions for the
same prompt, from which the completion's quantile reward is computed,
:func:`griffon.align.losses.quantile_reward`). Each completion is one row: the prompt's tokens
then the completion's (and the tokenizer's EOS where it has one), the completion's tokens marked as
the ones whose log-probabilities sum to the sequence's ``log pi(y|x)``.

The reference policy's log-probabilities are computed once, from the model the run starts from,
before its first step (:func:`reference_logps`), and stored with the run
(``reference_logps.safetensors``), so training holds one model and a resume reads them back.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from griffon.align.jsonl import read_objects
from griffon.align.losses import dpo_loss, qrpo_loss, quantile_reward
from griffon.align.sft import (
    ShuffledLoader,
    batch_count,
    check_learnable,
    examples_tokenizer,
    first_target,
    in_batches,
    split_examples,
)
from griffon.data.sources import DataError
from griffon.data.tokenizers import Tokenizer

KINDS = ("dpo", "qrpo")


def read_preference_examples(path: str | Path, kind: str) -> list[dict]:
    """The examples of a DPO or QRPO JSONL file, each checked; :class:`DataError` naming the file and line."""
    texts = ("prompt", "chosen", "rejected") if kind == "dpo" else ("prompt", "completion")
    out = []
    for where, ex in read_objects(path):
        for key in texts:
            if not isinstance(ex.get(key), str):
                raise DataError(f"{where}: {key!r} must be a string")
            if key != "prompt" and not ex[key]:
                raise DataError(f"{where}: {key!r} is empty")
        if kind == "dpo" and ex["chosen"] == ex["rejected"]:
            raise DataError(f"{where}: 'chosen' and 'rejected' are the same text (a pair that teaches nothing)")
        if kind == "qrpo":
            reward, refs = ex.get("reward"), ex.get("ref_rewards")
            if not _finite(reward):
                raise DataError(f"{where}: 'reward' must be a finite number, got {reward!r}")
            if not isinstance(refs, list) or len(refs) < 2 or not all(_finite(r) for r in refs):
                raise DataError(f"{where}: 'ref_rewards' must be a list of 2 or more finite numbers")
        out.append(ex)
    if not out:
        raise DataError(f"{path} holds no examples")
    return out


def _finite(x) -> bool:
    """Whether ``x`` is a real number (not a bool) that a float holds finitely (an int of 400
    digits is not)."""
    return real_value(x) is not None


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
    (rows, seq_len + 1); DPO's example i is rows 2i (chosen) and 2i + 1 (rejected); QRPO's row i
    has the quantile reward ``quantiles[i]`` and the raw ``rewards[i]``."""

    kind: str
    tokens: np.ndarray
    segment_pos: np.ndarray
    targets: np.ndarray
    quantiles: np.ndarray
    rewards: np.ndarray
    truncated: int
    needs: list[int | None]
    """Each example's smallest ``seq_len`` at which it has something to learn: a completion token
    (DPO: in both rows, and the rows differ by then; :func:`~griffon.align.sft.first_target`)."""

    @property
    def per_example(self) -> int:
        return 2 if self.kind == "dpo" else 1

    @property
    def n_examples(self) -> int:
        return len(self.tokens) // self.per_example


def build_rows(examples: list[dict], kind: str, tokenizer: Tokenizer, seq_len: int) -> PreferenceRows:
    """The rows of ``examples``: DPO's two a pair, else one a completion (its quantile reward where
    the example has ``ref_rewards``)."""
    width = seq_len + 1
    pairs = []
    for ex in examples:
        prompt = tokenizer.encode(ex["prompt"])
        for key in ("chosen", "rejected") if kind == "dpo" else ("completion",):
            completion = tokenizer.encode(ex[key]) + ([tokenizer.eos_id] if tokenizer.eos_id is not None else [])
            pairs.append((prompt, completion))
    n = len(pairs)
    tokens = np.zeros((n, width), dtype=np.int64)
    targets = np.zeros((n, width), dtype=bool)
    truncated = 0
    firsts: list[int | None] = []
    for i, (prompt, completion) in enumerate(pairs):
        ids = (prompt + completion)[:width]
        truncated += len(prompt) + len(completion) > width
        tokens[i, : len(ids)] = ids
        targets[i, len(prompt) : len(ids)] = True
        targets[i, 0] = False  # nothing predicts a row's first token
        firsts.append(first_target([False] * len(prompt) + [True] * len(completion)))
    needs = firsts
    if kind == "dpo":  # a pair teaches once both rows have a target and they differ
        needs = []
        for (prompt, chosen), (_, rejected), a, b in zip(pairs[0::2], pairs[1::2], firsts[0::2], firsts[1::2],
                                                          strict=True):  # fmt: skip
            c, r = prompt + chosen, prompt + rejected
            differ = next((j for j, (x, y) in enumerate(zip(c, r, strict=False)) if x != y), min(len(c), len(r)))
            needs.append(None if a is None or b is None else max(a, b, differ))
    seg = np.broadcast_to(np.arange(width), (n, width)).copy()
    rewards = np.array([real_value(ex.get("reward", 0.0)) for ex in examples], dtype=np.float64)
    quantiles = np.array([quantile_reward(ex["reward"], ex["ref_rewards"]) if "ref_rewards" in ex else 0.0
                          for ex in examples])  # fmt: skip
    return PreferenceRows(kind, tokens, seg, targets, quantiles, rewards, truncated, needs)


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
    (DPO: 2 rows each), ``rows`` the row indices (for the reference log-probabilities and the
    quantiles)."""

    unit = "examples"

    def __init__(self, rows: PreferenceRows, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.rows = rows
        super().__init__(rows.n_examples, batch_size, seed, rank, world_size)

    def take(self, items: np.ndarray) -> tuple[torch.Tensor, ...]:
        return batch_of(self.rows, items)


def batch_of(rows: PreferenceRows, examples: np.ndarray) -> tuple[torch.Tensor, ...]:
    """The rows of ``examples`` (DPO: chosen and rejected next to each other) and their indices."""
    k = rows.per_example
    index = (examples[:, None] * k + np.arange(k)).reshape(-1)
    return (
        *(torch.from_numpy(a[index]) for a in (rows.tokens, rows.segment_pos, rows.targets)),
        torch.from_numpy(index),
    )


def eval_batches(rows: PreferenceRows, batch_size: int, max_batches: int | None = None) -> Iterator[tuple]:
    """The examples in order, ``batch_size`` at a time (the first ``max_batches`` batches)."""
    return in_batches(rows.n_examples, batch_size, max_batches, lambda items: batch_of(rows, items))


def preference_loss(
    logps: torch.Tensor, ref: torch.Tensor, rows: PreferenceRows, index: torch.Tensor, beta: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The batch's DPO or QRPO loss from its rows' policy and reference log-probabilities, and the
    statistics to log: the implicit rewards (DPO: chosen, rejected, margins, accuracy; QRPO: the
    rewards and quantiles of the batch) and ``kl_ref``, the mean of ``log pi_ref - log pi`` over
    the batch's completions, an estimate of KL(pi_ref || pi) where they are the reference policy's
    samples (QRPO's offline setting)."""
    ref = ref.to(logps.device, logps.dtype)
    stats: dict[str, torch.Tensor] = {"kl_ref": (ref - logps).detach().mean()}
    if rows.kind == "dpo":
        loss, logs = dpo_loss(logps[0::2], logps[1::2], ref[0::2], ref[1::2], beta)
        return loss, stats | {k: v.mean() for k, v in logs.items()}
    q = torch.from_numpy(rows.quantiles[index.cpu().numpy()]).to(logps.device, logps.dtype)
    loss, logs = qrpo_loss(logps, ref, q, beta)
    reward = torch.from_numpy(rows.rewards[index.cpu().numpy()])
    return loss, stats | {"implicit_reward": logs["rewards"].mean(), "quantile": q.mean(), "reward": reward.mean()}


@dataclass
class PreferenceData:
    """A run's DPO or QRPO data, read, checked and tokenized before anything is written."""

    kind: str
    tokenizer: Tokenizer
    train: PreferenceRows
    val: PreferenceRows
    unlearnable: int = 0
    """Examples with nothing to learn within ``seq_len`` (a few are trained on for nothing)."""

    @classmethod
    def open(cls, kind: str, path: str | None, tokenizer_spec: str, seq_len: int, val_fraction: float, seed: int,
             vocab_size: int) -> PreferenceData:  # fmt: skip
        tokenizer = examples_tokenizer(kind, path, tokenizer_spec, vocab_size)
        train, val = split_examples(read_preference_examples(path, kind), val_fraction, seed)
        rows = [build_rows(split, kind, tokenizer, seq_len) for split in (train, val)]
        unlearnable = check_learnable(rows[0].needs, rows[1].needs, seq_len, "examples")
        return cls(kind, tokenizer, *rows, unlearnable)

    def loader(self, batch_size: int, seed: int, rank: int, world_size: int) -> PreferenceLoader:
        return PreferenceLoader(self.train, batch_size, seed, rank, world_size)

    def eval_batches(self, batch_size: int, max_batches: int | None = None):
        return eval_batches(self.val, batch_size, max_batches)

    def eval_batch_count(self, batch_size: int, max_batches: int | None = None) -> int:
        return batch_count(self.val.n_examples, batch_size, max_batches)

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


class PreferenceObjective:
    """DPO's or QRPO's objective for the training loop (:class:`griffon.train.objective.Objective`):
    batches of :class:`PreferenceLoader`, the reference log-probabilities of both splits."""

    def __init__(self, data: PreferenceData, reference: dict[str, torch.Tensor], beta: float) -> None:
        self.data, self.reference, self.beta = data, reference, beta

    def _loss(self, model: nn.Module, batch: tuple, split: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        tokens, seg, targets, index = batch
        rows = self.data.train if split == "train" else self.data.val
        logps = sequence_logps(model, tokens, seg, targets)
        return preference_loss(logps, self.reference[split][index.cpu()], rows, index, self.beta)

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
