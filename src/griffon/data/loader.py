"""Packing loader: documents concatenated into fixed-length sequences, with ``segment_pos``.

Each epoch shuffles the document order (seeded by ``seed + epoch``), concatenates the documents
into one stream and cuts it into sequences of ``seq_len + 1`` tokens (inputs and shifted
targets) that overlap by one token. ``segment_pos`` counts from 0 at every document start, so
the model resets its recurrence, conv and attention there. Sequence ``i`` of a step goes to rank
``i // batch_size``: the union over ranks is the single-process batch of the same global size.
The position is two integers (epoch, step), so resuming mid-epoch is exact.
"""

from __future__ import annotations

import json
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


def eval_batch_count(split: TokenSplit, seq_len: int, batch_size: int, max_batches: int | None = None) -> int:
    """How many batches :func:`eval_batches` yields for these arguments."""
    n_seq = (split.n_tokens - 1) // seq_len
    if max_batches is not None:
        n_seq = min(n_seq, max_batches * batch_size)
    return -(-n_seq // batch_size)


def eval_batches(split: TokenSplit, seq_len: int, batch_size: int, max_batches: int | None = None):
    """Unshuffled batches over the split: all of it once, or ``max_batches`` batches of sequences
    spread evenly across it (so a partial evaluation still sees every held-out document)."""
    stream = DocumentStream(split, np.arange(split.n_docs))
    n_seq = (split.n_tokens - 1) // seq_len
    if n_seq == 0:
        raise DataError(f"validation split has {split.n_tokens} tokens, fewer than seq_len + 1 = {seq_len + 1}")
    indices = np.arange(n_seq)
    if max_batches is not None and max_batches * batch_size < n_seq:
        indices = np.unique(np.linspace(0, n_seq - 1, max_batches * batch_size).round().astype(np.int64))
    for start in range(0, len(indices), batch_size):
        yield _stack([stream.sequence(int(j), seq_len) for j in indices[start : start + batch_size]])
