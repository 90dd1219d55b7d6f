"""A training run's data, classified once from ``data.path``: prepared tokens, or raw text to prepare."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from griffon.config import ConfigError
from griffon.data.corpus import default_corpus
from griffon.data.prepare import is_prepared, prepare_corpus, read_meta, training_documents, verify
from griffon.data.sources import DataError
from griffon.data.tokenizers import bpe_vocab_size, load_tokenizer


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
