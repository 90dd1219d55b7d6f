"""Tokenizers: byte-level (default, no files), HF ``tokenizers`` JSON, sentencepiece models.

Every tokenizer maps text to ids and back, knows its vocabulary size and how many UTF-8 bytes
each id stands for (for bits-per-byte), and saves itself into a run directory so that the run
can be sampled or resumed alone, or into an exported HF directory in a form that
``transformers.AutoTokenizer`` loads and that encodes every text to the same ids.
"""

from __future__ import annotations

import functools
import json
import re
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
    directory: Path | None = None
    """The directory it was loaded from (None: built in code), where its chat template may be."""

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def token_bytes(self, document_start: bool = False) -> np.ndarray:
        """(vocab_size,) UTF-8 byte length of each token (0 for special tokens), as it decodes
        inside a text; with ``document_start``, as the first token of a text, where a tokenizer
        that prepends a word-boundary marker (sentencepiece's dummy prefix) decodes it without its
        leading space. So for the ids of any text, the first counted with ``document_start``, the
        counts sum to the UTF-8 length of the decoded text."""
        raise NotImplementedError

    def byte_counts(self, ids: list[int]) -> np.ndarray:
        """UTF-8 bytes of each token of a text's ids (sums to the decoded text's length)."""
        counts = self.token_bytes()[np.asarray(ids, dtype=np.int64)]
        if len(ids):
            counts[0] = self.token_bytes(document_start=True)[ids[0]]
        return counts

    def save(self, directory: Path) -> None:
        """Write ``tokenizer.json`` (and any model file) into ``directory``."""
        raise NotImplementedError

    def save_hf(self, directory: Path) -> None:
        """Write the files ``transformers.AutoTokenizer.from_pretrained(directory)`` reads, encoding
        every text as :meth:`encode` does (no special tokens added)."""
        raise NotImplementedError

    def describe(self) -> dict:
        return {"kind": self.kind, "vocab_size": self.vocab_size}


def _write_tokenizer_config(directory: Path, fields: dict) -> None:
    text = json.dumps(fields, indent=2, ensure_ascii=False) + "\n"
    atomic_write(Path(directory) / "tokenizer_config.json", lambda tmp: tmp.write_text(text, encoding="utf-8"))


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as tokens: 256 ids, nothing to train, nothing unknown."""

    kind = "bytes"
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def token_bytes(self, document_start: bool = False) -> np.ndarray:
        return np.ones(256, dtype=np.int64)

    def save(self, directory: Path) -> None:
        text = json.dumps({"griffon_tokenizer": "bytes"}) + "\n"
        atomic_write(Path(directory) / "tokenizer.json", lambda tmp: tmp.write_text(text))

    def save_hf(self, directory: Path) -> None:
        """A byte-level BPE without merges: GPT-2's byte alphabet, the character for byte b at id b.

        HF tokenizers need an end-of-text token and the 256 ids leave no room for one, so the
        newline (id 10) is declared as such, as griffon's lm-eval model uses it; HF's
        ``decode(..., skip_special_tokens=True)`` then drops newlines.
        """
        from tokenizers import Tokenizer as _Tok
        from tokenizers import decoders, models, pre_tokenizers

        alphabet = _byte_level_inverse()
        tok = _Tok(models.BPE(vocab=dict(alphabet), merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        atomic_write(Path(directory) / "tokenizer.json", lambda tmp: tok.save(str(tmp)))
        newline = next(char for char, byte in alphabet.items() if byte == ord("\n"))
        _write_tokenizer_config(directory, {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": newline})


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

    def token_bytes(self, document_start: bool = False) -> np.ndarray:
        spec = json.loads(self._tok.to_str())
        byte_level = "ByteLevel" in json.dumps(spec.get("decoder"))
        # A Metaspace pre-tokenizer that prepends "▁" to the text: its decoder drops that space again
        prefix = document_start and _prepends_space(spec.get("pre_tokenizer"))
        inverse = _byte_level_inverse() if byte_level else {}
        special = {t.content for t in self._tok.get_added_tokens_decoder().values() if t.special}
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        for i in range(self.vocab_size):
            piece = self._tok.id_to_token(i)
            if piece is not None and _BYTE_FALLBACK.fullmatch(piece):
                lengths[i] = 1  # a byte-fallback token, whether or not it is registered as special
            elif piece is None or piece in special:
                continue
            elif byte_level and all(c in inverse for c in piece):
                lengths[i] = len(piece)  # each character of the byte-level alphabet is one byte
            else:
                text = piece.replace("\u2581", " ")
                lengths[i] = len(text.encode("utf-8")) - (1 if prefix and text.startswith(" ") else 0)
        return lengths

    def save(self, directory: Path) -> None:
        atomic_write(Path(directory) / "tokenizer.json", lambda tmp: shutil.copyfile(self.path, tmp))

    def save_hf(self, directory: Path) -> None:
        self.save(directory)
        fields: dict = {"tokenizer_class": "PreTrainedTokenizerFast"}
        if self.eos_id is not None:
            fields["eos_token"] = self._tok.id_to_token(self.eos_id)
        _write_tokenizer_config(directory, fields)


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

    def token_bytes(self, document_start: bool = False) -> np.ndarray:
        # The dummy prefix: sentencepiece prepends "▁" to a text and drops its space when decoding.
        prefix = document_start and self._sp.encode("a", out_type=str)[0].startswith("\u2581")
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        for i in range(self.vocab_size):
            if self._sp.is_control(i) or self._sp.is_unknown(i):
                continue
            if self._sp.is_byte(i):
                lengths[i] = 1
            else:
                text = self._sp.id_to_piece(i).replace("\u2581", " ")
                lengths[i] = len(text.encode("utf-8")) - (1 if prefix and text.startswith(" ") else 0)
        return lengths

    def save(self, directory: Path) -> None:
        atomic_write(Path(directory) / "tokenizer.model", lambda tmp: shutil.copyfile(self.path, tmp))
        text = json.dumps({"griffon_tokenizer": "sentencepiece", "model": "tokenizer.model"}) + "\n"
        atomic_write(Path(directory) / "tokenizer.json", lambda tmp: tmp.write_text(text))

    def save_hf(self, directory: Path) -> None:
        """``tokenizer.model`` as a generic fast tokenizer, which transformers (5 and later) builds
        from the model file's own settings; ``GemmaTokenizer`` would impose Gemma's normalisation
        on any other model. No BOS or EOS is added, as in :meth:`encode`."""
        atomic_write(Path(directory) / "tokenizer.model", lambda tmp: shutil.copyfile(self.path, tmp))
        _write_tokenizer_config(
            directory, {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False, "add_eos_token": False}
        )


_BYTE_FALLBACK = re.compile(r"<0x[0-9A-Fa-f]{2}>")


@functools.cache
def _byte_level_inverse() -> dict[str, int]:
    """GPT-2's byte-level alphabet (HF ``ByteLevel``): printable characters standing for bytes."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _prepends_space(pre_tokenizer: dict | None) -> bool:
    """Whether an HF pre-tokenizer (possibly a sequence) is a Metaspace that prepends "▁" to a text."""
    if not pre_tokenizer:
        return False
    if pre_tokenizer.get("type") == "Sequence":
        return any(_prepends_space(p) for p in pre_tokenizer.get("pretokenizers", []))
    if pre_tokenizer.get("type") != "Metaspace":
        return False
    return pre_tokenizer.get("prepend_scheme", "always") in ("always", "first") or bool(
        pre_tokenizer.get("add_prefix_space")
    )


def bpe_vocab_size(spec: str | Path) -> int | None:
    """N for a tokenizer named ``bpe-N`` (a byte-level BPE to be trained on the corpus), else None."""
    name = str(spec)
    if not name.startswith("bpe-") or Path(name).exists():
        return None
    try:
        n = int(name[4:])
    except ValueError:
        raise TokenizerError(f"tokenizer {name!r}: write bpe-N with N the vocabulary size, e.g. bpe-4096") from None
    if n <= 256:
        raise TokenizerError(f"tokenizer {name!r}: a byte-level BPE needs more than 256 tokens")
    return n


def load_tokenizer(spec: str | Path) -> Tokenizer:
    """``bytes``, a ``tokenizer.json``, a sentencepiece ``.model``, or a directory holding one."""
    if str(spec) == "bytes":
        return ByteTokenizer()
    tokenizer = _load_tokenizer_file(spec)
    tokenizer.directory = Path(spec) if Path(spec).is_dir() else Path(spec).parent
    return tokenizer


def _load_tokenizer_file(spec: str | Path) -> Tokenizer:
    if bpe_vocab_size(spec) is not None:
        raise TokenizerError(f"{spec} is trained on a corpus when the corpus is prepared; there is no file to load")
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
        name = head.get("model")
        if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
            raise TokenizerError(
                f'{path}: a sentencepiece marker needs "model": the name of a .model file beside it, got {name!r}'
            )
        return SentencePieceTokenizer(path.parent / name)
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
