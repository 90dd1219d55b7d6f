"""A pretraining run's data: classified once from ``data.path`` (prepared tokens, or raw text to
prepare), then read as packed sequences."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from griffon.config import ConfigError
from griffon.data.corpus import default_corpus
from griffon.data.loader import PackedLoader, TokenSplit, eval_batch_count, sequence_batches, sequence_count
from griffon.data.prepare import is_prepared, prepare_corpus, read_meta, training_documents, verify
from griffon.data.sources import DataError
from griffon.data.tokenizers import Tokenizer, bpe_vocab_size, load_tokenizer


@dataclass(frozen=True)
class TrainingData:
    """Where a run's tokens come from (:meth:`resolve`): ``prepared``, a directory written by
    ``griffon data prepare`` (its tokenizer is fixed), or ``corpora``, raw text (the embedded
    corpus when ``data.path`` is unset) that the run prepares into a directory of its own with
    ``data.tokenizer``. Exactly one of the two is set."""

    prepared: Path | None = None
    corpora: tuple[Path, ...] = ()

    @classmethod
    def resolve(cls, path: str | Path | None) -> TrainingData:
        """Classify ``data.path``; :class:`DataError` if it names nothing."""
        if path is None:
            return cls(corpora=(default_corpus(),))
        path = Path(path)
        if is_prepared(path):
            return cls(prepared=path)
        if not path.exists():
            raise DataError(f"data.path {path} not found (a prepared directory or a corpus: .txt, .jsonl[.gz], ...)")
        return cls(corpora=(path,))

    def check(self, tokenizer: str, vocab_size: int, verify_shards: bool) -> None:
        """Validate before anything is written: a prepared directory's ``meta.json``, tokenizer and,
        with ``verify_shards``, its shards' SHA-256; for raw text, the ``tokenizer`` it will be
        prepared with. Either tokenizer's ids must fit the model's ``vocab_size``."""
        if self.prepared is not None:
            read_meta(self.prepared)
            _check_vocab(load_tokenizer(self.prepared).vocab_size, vocab_size)
            if verify_shards:
                verify(self.prepared)
            return
        bpe = bpe_vocab_size(tokenizer)
        _check_vocab(bpe if bpe is not None else load_tokenizer(tokenizer).vocab_size, vocab_size)

    def directory(self, own: Path) -> Path:
        """Where the prepared tokens are: the prepared directory, or ``own``, the directory raw
        text is prepared into (:meth:`prepare`)."""
        return self.prepared if self.prepared is not None else own

    def prepare(self, own: Path, tokenizer: str, val_fraction: float, verify_shards: bool) -> Path:
        """The prepared tokens' directory (:meth:`directory`): raw text is prepared into ``own``
        with ``tokenizer`` (atomically, so a kill midway leaves nothing to mistake for data), or,
        when an earlier start prepared it there, checked: same tokenizer, and with
        ``verify_shards`` the shards' SHA-256."""
        if self.prepared is not None:
            return self.prepared
        if not own.exists():
            prepare_corpus(self.corpora, tokenizer, own, val_fraction, seed=0)
        else:
            _check_prepared_tokenizer(own, tokenizer)
            if verify_shards:
                verify(own)
        return own

    def training_split(self) -> tuple[float, int] | None:
        """A prepared directory's training split: (bytes per token, bytes); None for raw text."""
        if self.prepared is None:
            return None
        train = read_meta(self.prepared)["splits"]["train"]
        return train["bytes"] / max(train["tokens"], 1), int(train["bytes"])

    def training_documents(self, val_fraction: float) -> list[str]:
        """Raw text's documents that preparing with ``val_fraction`` puts in the training split."""
        if self.prepared is not None:
            raise DataError(f"{self.prepared} is prepared: its documents are tokens")
        return training_documents(self.corpora, val_fraction, seed=0)


@dataclass
class PackedData:
    """A pretraining run's tokens as the training loop reads them: :class:`TrainingData`, raw
    text prepared into ``own`` (the run's ``data/``), read as packed sequences of ``seq_len + 1``
    tokens (:class:`~griffon.data.loader.PackedLoader`). Opened (:meth:`open`) before anything is
    written; :meth:`prepare` writes."""

    source: TrainingData
    own: Path
    tokenizer_spec: str
    seq_len: int
    val_fraction: float
    verify: bool

    @classmethod
    def open(cls, path: str | Path | None, own: Path, tokenizer_spec: str, seq_len: int, val_fraction: float,
             verify: bool, vocab_size: int) -> PackedData:  # fmt: skip
        """Classify ``path`` and check it (:meth:`TrainingData.check`); nothing is written."""
        source = TrainingData.resolve(path)
        source.check(tokenizer_spec, vocab_size, verify)
        return cls(source, own, tokenizer_spec, seq_len, val_fraction, verify)

    @property
    def directory(self) -> Path:
        return self.source.directory(self.own)

    def prepare(self) -> None:
        """Prepare raw text into ``own`` (:meth:`TrainingData.prepare`); one process does it."""
        self.source.prepare(self.own, self.tokenizer_spec, self.val_fraction, self.verify)

    def warnings(self) -> list[str]:
        return []

    @cached_property
    def tokenizer(self) -> Tokenizer:
        return load_tokenizer(self.directory)

    @cached_property
    def _val(self) -> TokenSplit:
        return TokenSplit.open(self.directory, "val")

    def loader(self, batch_size: int, seed: int, rank: int, world_size: int) -> PackedLoader:
        return PackedLoader(TokenSplit.open(self.directory, "train"), self.seq_len, batch_size, seed, rank, world_size)

    def eval_batches(self, batch_size: int, max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, ...]]:
        return sequence_batches(self._val, self.seq_len, batch_size, max_batches)

    def eval_batch_count(self, batch_size: int, max_batches: int | None = None) -> int:
        return eval_batch_count(sequence_count(self._val, self.seq_len), batch_size, max_batches)


def _check_vocab(tokenizer_size: int, vocab_size: int) -> None:
    if tokenizer_size > vocab_size:
        raise ConfigError(
            f"the data's tokenizer has {tokenizer_size} tokens but model.vocab_size is {vocab_size}; "
            f"set model.vocab_size={tokenizer_size}"
        )


def _check_prepared_tokenizer(directory: Path, spec: str) -> None:
    """A run's ``data/`` left by an earlier start must hold the tokenizer ``data.tokenizer`` names."""
    got = read_meta(directory)["tokenizer"]
    bpe = bpe_vocab_size(spec)
    # a BPE trained on a small corpus may stop short of its N tokens
    same = got["vocab_size"] <= bpe if bpe is not None else got == load_tokenizer(spec).describe()
    if not same:
        raise DataError(f"{directory} was prepared with another tokenizer than data.tokenizer; remove it")
