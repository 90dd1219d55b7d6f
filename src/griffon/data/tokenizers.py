"""Tokenizers: byte-level (default, no files), HF ``tokenizers`` JSON, sentencepiece models.

Every tokenizer maps text to ids and back, knows its vocabulary size and how many UTF-8 bytes
each id stands for (for bits-per-byte), and saves itself into a run directory so that the run
can be sampled or resumed alone.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from griffon.atomic import atomic_write


class TokenizerError(ValueError):
    """A tokenizer file is missing or unreadable, or does not fit the model."""


class Tokenizer:
    """Interface shared by all tokenizers."""

    kind: str
    vocab_size: int
    eos_id: int | None = None

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def token_bytes(self) -> np.ndarray:
        """(vocab_size,) UTF-8 byte length of each token (0 for special tokens)."""
        raise NotImplementedError

    def save(self, directory: Path) -> None:
        """Write ``tokenizer.json`` (and any model file) into ``directory``."""
        raise NotImplementedError

    def describe(self) -> dict:
        return {"kind": self.kind, "vocab_size": self.vocab_size}


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as tokens: 256 ids, nothing to train, nothing unknown."""

    kind = "bytes"
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def token_bytes(self) -> np.ndarray:
        return np.ones(256, dtype=np.int64)

    def save(self, directory: Path) -> None:
        text = json.dumps({"griffon_tokenizer": "bytes"}) + "\n"
        atomic_write(Path(directory) / "tokenizer.json", lambda tmp: tmp.write_text(text))


class HFTokenizer(Tokenizer):
    """Any HF ``tokenizers`` ``tokenizer.json`` (BPE, WordPiece, Unigram...)."""

    kind = "hf"

    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer as _Tok

        self.path = Path(path)
        try:
            self._tok = _Tok.from_file(str(self.path))
        except Exception as e:  # the Rust side raises a plain Exception
            raise TokenizerError(f"cannot load tokenizer {self.path}: {e}") from None
        self.vocab_size = self._tok.get_vocab_size()
        self.eos_id = next(
            (
                self._tok.token_to_id(t)
                for t in ("<|endoftext|>", "</s>", "<eos>")
                if self._tok.token_to_id(t) is not None
            ),
            None,
        )

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_bytes(self) -> np.ndarray:
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        special = {t.content for t in self._tok.get_added_tokens_decoder().values() if t.special}
        for i in range(self.vocab_size):
            piece = self._tok.id_to_token(i)
            if piece is None or piece in special:
                continue
            lengths[i] = len(self._tok.decode([i]).encode("utf-8"))
        return lengths

    def save(self, directory: Path) -> None:
        atomic_write(Path(directory) / "tokenizer.json", lambda tmp: shutil.copyfile(self.path, tmp))


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece ``.model`` file, such as Gemma's (needs the ``sentencepiece`` package)."""

    kind = "sentencepiece"

    def __init__(self, path: str | Path) -> None:
        try:
            import sentencepiece as spm
        except ImportError:
            raise TokenizerError("sentencepiece tokenizers need `pip install sentencepiece`") from None
        self.path = Path(path)
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except Exception as e:
            raise TokenizerError(f"cannot load sentencepiece model {self.path}: {e}") from None
        self.vocab_size = self._sp.get_piece_size()
        eos = self._sp.eos_id()
        self.eos_id = eos if eos >= 0 else None

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def token_bytes(self) -> np.ndarray:
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        for i in range(self.vocab_size):
            if self._sp.is_control(i) or self._sp.is_unknown(i):
                continue
            if self._sp.is_byte(i):
                lengths[i] = 1
            else:
                lengths[i] = len(self._sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
        return lengths

    def save(self, directory: Path) -> None:
        atomic_write(Path(directory) / "tokenizer.model", lambda tmp: shutil.copyfile(self.path, tmp))
        text = json.dumps({"griffon_tokenizer": "sentencepiece", "model": "tokenizer.model"}) + "\n"
        atomic_write(Path(directory) / "tokenizer.json", lambda tmp: tmp.write_text(text))


def load_tokenizer(spec: str | Path) -> Tokenizer:
    """``bytes``, a ``tokenizer.json``, a sentencepiece ``.model``, or a directory holding one."""
    if str(spec) == "bytes":
        return ByteTokenizer()
    path = Path(spec)
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            path = path / "tokenizer.json"
        elif (path / "tokenizer.model").is_file():
            path = path / "tokenizer.model"
        else:
            raise TokenizerError(f"{spec}: no tokenizer.json or tokenizer.model in this directory")
    if not path.is_file():
        raise TokenizerError(f"tokenizer not found: {spec} (use 'bytes', a tokenizer.json or a .model file)")
    if path.suffix == ".model":
        return SentencePieceTokenizer(path)
    try:
        head = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path} is not a tokenizer JSON file: {e}") from None
    marker = head.get("griffon_tokenizer") if isinstance(head, dict) else None
    if marker == "bytes":
        return ByteTokenizer()
    if marker == "sentencepiece":
        return SentencePieceTokenizer(path.parent / head["model"])
    return HFTokenizer(path)


def train_bpe(texts: Iterator[str], vocab_size: int, out: str | Path) -> HFTokenizer:
    """Train a byte-level BPE tokenizer locally with HF ``tokenizers`` and save it as JSON."""
    from tokenizers import Tokenizer as _Tok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < 257:
        raise TokenizerError(f"a byte-level BPE needs vocab_size > 256, got {vocab_size}")
    tok = _Tok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(out))
    return HFTokenizer(out)
