"""The training loop's loaders and evaluation batches.

:class:`PackedLoader` reads a prepared split as documents concatenated into fixed-length
sequences, with ``segment_pos`` (pretraining); :class:`ShuffledLoader` reads a set of items
(packed rows of examples, preference pairs) shuffled every epoch. Both hold their position as
two integers (epoch, step), so resuming mid-epoch is exact, and both give rank ``r`` of a step the
items ``r * batch_size`` onwards: the union over ranks is the single-process batch of the same
global size. :func:`eval_batches` is every evaluation's batching.

Packing: each epoch shuffles the document order (seeded by ``seed + epoch``), concatenates the documents
into one stream and cuts it into sequences of ``seq_len + 1`` tokens (inputs and shifted
targets) that overlap by one token. ``segment_pos`` counts from 0 at every document start, so
the model resets its recurrence, conv and attention there.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from griffon.data.sources import DataError


@dataclass
class TokenSplit:
    """One split of a prepared data directory, memory-mapped."""

    tokens: np.ndarray  # (n_tokens,) uint16/uint32 memmap
    doc_offsets: np.ndarray  # (n_docs + 1,) int64

    @classmethod
    def open(cls, directory: str | Path, split: str) -> TokenSplit:
        directory = Path(directory)
        meta_path = directory / "meta.json"
        if not meta_path.is_file():
            raise DataError(f"{directory} is not a prepared data directory (no meta.json); run `griffon data prepare`")
        meta = json.loads(meta_path.read_text())
        offsets = np.load(directory / f"{split}.docs.npy", allow_pickle=False)
        n = int(offsets[-1])
        if n == 0:
            raise DataError(f"{directory}: the {split} split is empty")
        path = directory / f"{split}.bin"
        dtype = np.dtype(meta["dtype"])
        if path.stat().st_size != n * dtype.itemsize:
            raise DataError(f"{path} holds {path.stat().st_size} bytes, meta.json says {n} {dtype.name} tokens")
        return cls(np.memmap(path, dtype=dtype, mode="r", shape=(n,)), offsets)

    @property
    def n_tokens(self) -> int:
        return int(self.doc_offsets[-1])

    @property
    def n_docs(self) -> int:
        return len(self.doc_offsets) - 1


class DocumentStream:
    """Documents of a split concatenated in a given order, read as overlapping sequences."""

    def __init__(self, split: TokenSplit, order: np.ndarray) -> None:
        self.split, self.order = split, order
        lengths = np.diff(split.doc_offsets)[order]
        self.starts = np.concatenate([[0], np.cumsum(lengths)])  # stream offset of each document

    def sequence(self, index: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens ``[index * seq_len, (index + 1) * seq_len + 1)`` of the stream and their segment_pos."""
        a = index * seq_len
        b = a + seq_len + 1
        k = int(np.searchsorted(self.starts, a, side="right")) - 1
        tokens, seg = [], []
        while a < b:
            doc = self.order[k]
            doc_start, doc_end = self.split.doc_offsets[doc], self.split.doc_offsets[doc + 1]
            inner = a - self.starts[k]  # offset inside the document
            take = min(b - a, doc_end - doc_start - inner)
            tokens.append(self.split.tokens[doc_start + inner : doc_start + inner + take])
            seg.append(np.arange(inner, inner + take))
            a += take
            k += 1
        return np.concatenate(tokens).astype(np.int64), np.concatenate(seg)


class PackedLoader:
    """Yields ``(tokens, segment_pos)``, both (batch_size, seq_len + 1) int64, for this rank."""

    def __init__(
        self,
        split: TokenSplit,
        seq_len: int,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
    ) -> None:
        self.split, self.seq_len, self.batch_size = split, seq_len, batch_size
        self.seed, self.rank, self.world_size, self.shuffle = seed, rank, world_size, shuffle
        self.steps_per_epoch = (split.n_tokens - 1) // seq_len // (batch_size * world_size)
        if self.steps_per_epoch == 0:
            raise DataError(
                f"{split.n_tokens} tokens cannot fill one step of {world_size} x {batch_size} sequences "
                f"of {seq_len + 1} tokens; use less batch/seq_len or more data"
            )
        self.epoch, self.step = 0, 0
        self._stream: DocumentStream | None = None
        self._stream_epoch = -1

    def __iter__(self) -> PackedLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.step >= self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        if self._stream is None or self._stream_epoch != self.epoch:
            n = self.split.n_docs
            rng = np.random.default_rng(self.seed + self.epoch)
            self._stream = DocumentStream(self.split, rng.permutation(n) if self.shuffle else np.arange(n))
            self._stream_epoch = self.epoch
        first = (self.step * self.world_size + self.rank) * self.batch_size
        self.step += 1
        return _stack([self._stream.sequence(i, self.seq_len) for i in range(first, first + self.batch_size)])

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.step, self.seed = int(state["epoch"]), int(state["step"]), int(state["seed"])
        self._stream = None


def _stack(rows: list[tuple[np.ndarray, np.ndarray]]) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.from_numpy(np.stack([r[0] for r in rows]))
    segment_pos = torch.from_numpy(np.stack([r[1] for r in rows]))
    return tokens, segment_pos


class ShuffledLoader:
    """Batches of ``batch_size`` of ``n`` items for this rank, the items shuffled every epoch
    (seeded by ``seed + epoch``); ``take`` makes a batch of the items it is given."""

    def __init__(self, n: int, take: Callable[[np.ndarray], tuple[torch.Tensor, ...]], batch_size: int,
                 seed: int = 0, rank: int = 0, world_size: int = 1, unit: str = "items",
                 hint: str = "lower data.batch_size") -> None:  # fmt: skip
        """``unit``: what an item is, and ``hint`` what to do when there are too few, for the
        message that says so."""
        self.n, self.take, self.batch_size = n, take, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.steps_per_epoch = n // (batch_size * world_size)
        if self.steps_per_epoch == 0:
            raise DataError(f"{n} {unit} cannot fill one step of {world_size} x {batch_size}; {hint}")
        self.epoch, self.step = 0, 0
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, its permutation)

    def __iter__(self) -> ShuffledLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, ...]:
        if self.step >= self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        if self._order is None or self._order[0] != self.epoch:
            self._order = (self.epoch, np.random.default_rng(self.seed + self.epoch).permutation(self.n))
        first = (self.step * self.world_size + self.rank) * self.batch_size
        self.step += 1
        return self.take(self._order[1][first : first + self.batch_size])

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.step, self.seed = int(state["epoch"]), int(state["step"]), int(state["seed"])
        self._order = None


def eval_batch_count(n: int, batch_size: int, max_batches: int | None = None) -> int:
    """How many batches :func:`eval_batches` yields for these arguments."""
    count = -(-n // batch_size)
    return count if max_batches is None else min(count, max_batches)


def eval_batches(
    n: int,
    take: Callable[[np.ndarray], tuple[torch.Tensor, ...]],
    batch_size: int,
    max_batches: int | None = None,
    spread: bool = False,
) -> Iterator[tuple[torch.Tensor, ...]]:
    """Unshuffled batches of items 0..n-1, ``batch_size`` at a time (``take`` makes a batch of the
    items it is given): all of them once, or ``max_batches`` batches, of the first items or, with
    ``spread``, of items spread evenly over all of them."""
    items = np.arange(n)
    if max_batches is not None and max_batches * batch_size < n:
        if spread:  # distinct: the points are at least one apart
            items = np.unique(np.linspace(0, n - 1, max_batches * batch_size).round().astype(np.int64))
        else:
            items = items[: max_batches * batch_size]
    for start in range(0, len(items), batch_size):
        yield take(items[start : start + batch_size])


def sequence_count(split: TokenSplit, seq_len: int) -> int:
    """The sequences of ``seq_len + 1`` tokens (overlapping by one) that ``split`` holds unshuffled;
    :class:`DataError` if none."""
    n_seq = (split.n_tokens - 1) // seq_len
    if n_seq == 0:
        raise DataError(f"validation split has {split.n_tokens} tokens, fewer than seq_len + 1 = {seq_len + 1}")
    return n_seq


def sequence_batches(split: TokenSplit, seq_len: int, batch_size: int, max_batches: int | None = None):
    """:func:`eval_batches` of ``split``'s unshuffled sequences, spread over it (so a partial
    evaluation still sees every held-out document): ``(tokens, segment_pos)`` batches."""
    stream = DocumentStream(split, np.arange(split.n_docs))

    def take(items: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return _stack([stream.sequence(int(j), seq_len) for j in items])

    return eval_batches(sequence_count(split, seq_len), take, batch_size, max_batches, spread=True)
