"""``griffon data prepare``: tokenize documents into token shards split train/validation by document.

Output directory layout::

    train.bin, val.bin              token ids, uint16 (vocabularies up to 65536) or uint32
    train.docs.npy, val.docs.npy    (n_docs + 1,) int64 document start offsets, then the total
    token_bytes.npy                 UTF-8 bytes per token id (for bits per byte)
    tokenizer.json [tokenizer.model]
    meta.json                       tokenizer, dtype, counts, sources, SHA-256 of the .bin files
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from griffon.atomic import atomic_directory
from griffon.data.sources import DataError, iter_documents
from griffon.data.tokenizers import Tokenizer, bpe_vocab_size, load_tokenizer, train_bpe

SPLITS = ("train", "val")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def prepare(
    inputs: Sequence[str | Path],
    tokenizer: Tokenizer,
    out: str | Path,
    val_fraction: float = 0.1,
    seed: int = 0,
    field: str = "text",
    progress: bool = True,
) -> dict:
    """Tokenize ``inputs`` into ``out``; whole documents go to validation. Returns the metadata."""
    if not inputs:
        raise DataError("no input files given")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must lie in [0, 1), got {val_fraction}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"output {out} exists and is not a directory")
    if out.exists() and any(out.iterdir()):
        raise DataError(f"output directory {out} exists and is not empty; refusing to overwrite")

    # Pass 1: count documents, so that the validation split is an exact, seeded choice of them.
    n_docs = sum(1 for p in inputs for _ in iter_documents(p, field))
    if n_docs == 0:
        raise DataError(f"no documents found in {', '.join(map(str, inputs))}")
    val_ids = validation_ids(n_docs, val_fraction, seed)

    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    # Everything is written into a temporary directory renamed to ``out`` at the end: a failure
    # or a kill leaves no half-prepared directory that a run could mistake for data.
    with atomic_directory(out) as tmp:
        offsets, n_bytes = _tokenize(inputs, field, tokenizer, val_ids, n_docs, dtype, tmp, progress)
        for s in SPLITS:
            np.save(tmp / f"{s}.docs.npy", np.asarray(offsets[s], dtype=np.int64))
        np.save(tmp / "token_bytes.npy", tokenizer.token_bytes())
        tokenizer.save(tmp)
        meta = {
            "format": "griffon-tokens-v1",
            "tokenizer": tokenizer.describe(),
            "dtype": np.dtype(dtype).name,
            "sources": [str(p) for p in inputs],
            "seed": seed,
            "val_fraction": val_fraction,
            "splits": {
                s: {
                    "documents": len(offsets[s]) - 1,
                    "tokens": offsets[s][-1],
                    "bytes": n_bytes[s],
                    "sha256": _sha256(tmp / f"{s}.bin"),
                }
                for s in SPLITS
            },
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def validation_ids(n_docs: int, val_fraction: float, seed: int) -> set[int]:
    """The indices of the documents held out for validation: an exact, seeded choice of
    ``round(val_fraction * n_docs)`` of them (at least one)."""
    n_val = 0 if val_fraction == 0 else max(1, round(val_fraction * n_docs))
    if n_val >= n_docs:
        raise DataError(f"{n_docs} document(s) cannot be split into train and validation; give more documents")
    return set(np.random.default_rng(seed).permutation(n_docs)[:n_val].tolist())


def training_documents(
    inputs: Sequence[str | Path], val_fraction: float = 0.1, seed: int = 0, field: str = "text"
) -> list[str]:
    """The documents :func:`prepare` puts in the training split, in order."""
    docs = [d for p in inputs for d in iter_documents(p, field)]
    if not docs:
        raise DataError(f"no documents found in {', '.join(map(str, inputs))}")
    val_ids = validation_ids(len(docs), val_fraction, seed)
    return [d for i, d in enumerate(docs) if i not in val_ids]


def prepare_corpus(
    inputs: Sequence[str | Path],
    tokenizer: str,
    out: str | Path,
    val_fraction: float = 0.1,
    seed: int = 0,
    field: str = "text",
    progress: bool = False,
) -> dict:
    """:func:`prepare` with a tokenizer named as ``data.tokenizer`` names it: ``bytes``, a tokenizer
    file, or ``bpe-N``, a byte-level BPE of N tokens trained here on the training split only (the
    held-out documents stay unseen, so bits per byte on them stay honest)."""
    vocab = bpe_vocab_size(tokenizer)
    if vocab is None:
        return prepare(inputs, load_tokenizer(tokenizer), out, val_fraction, seed, field, progress)
    with tempfile.TemporaryDirectory(prefix="griffon-bpe-") as tmp:
        train_docs = training_documents(inputs, val_fraction, seed, field)
        tok = train_bpe(iter(train_docs), vocab, Path(tmp) / "tokenizer.json")
        return prepare(inputs, tok, out, val_fraction, seed, field, progress)


def _tokenize(
    inputs: Sequence[str | Path],
    field: str,
    tokenizer: Tokenizer,
    val_ids: set[int],
    n_docs: int,
    dtype: type,
    out: Path,
    progress: bool,
) -> tuple[dict[str, list[int]], dict[str, int]]:
    """Write the token shards; return each split's document offsets and byte count."""
    files = {s: open(out / f"{s}.bin", "wb") for s in SPLITS}
    offsets: dict[str, list[int]] = {s: [0] for s in SPLITS}
    n_bytes = {s: 0 for s in SPLITS}
    try:
        docs = (d for p in inputs for d in iter_documents(p, field))
        for i, text in enumerate(tqdm(docs, total=n_docs, desc="tokenizing", unit="doc", disable=not progress)):
            split = "val" if i in val_ids else "train"
            ids = np.asarray(tokenizer.encode(text), dtype=np.int64)
            if ids.size == 0:
                continue
            if ids.max() >= tokenizer.vocab_size:
                raise DataError(f"tokenizer produced id {ids.max()} >= its vocab_size {tokenizer.vocab_size}")
            files[split].write(ids.astype(dtype).tobytes())
            offsets[split].append(offsets[split][-1] + ids.size)
            n_bytes[split] += len(text.encode("utf-8"))
    finally:
        for f in files.values():
            f.close()
    if offsets["train"][-1] == 0:
        raise DataError("the training split is empty (all documents were empty?)")
    return offsets, n_bytes


def verify(directory: str | Path) -> dict:
    """Check a prepared data directory against its ``meta.json`` (file sizes and SHA-256 of the
    token shards); raise :class:`DataError` naming the first file that differs. Returns the metadata."""
    directory = Path(directory)
    meta = read_meta(directory)
    for s in SPLITS:
        path = directory / f"{s}.bin"
        if not path.is_file():
            raise DataError(f"{path} is missing")
        want = meta["splits"][s].get("sha256")
        got = _sha256(path)
        if want != got:
            raise DataError(
                f"{path} does not match meta.json (SHA-256 {got[:12]}..., recorded {str(want)[:12]}...): "
                "the file changed or is corrupted; prepare the data again"
            )
    return meta


def is_prepared(path: str | Path) -> bool:
    """Whether ``path`` is a prepared data directory (it has ``meta.json``), not a raw corpus."""
    return (Path(path) / "meta.json").is_file()


def read_meta(directory: str | Path) -> dict:
    """The ``meta.json`` of a prepared data directory; :class:`DataError` if there is none or it is malformed."""
    path = Path(directory) / "meta.json"
    if not path.is_file():
        raise DataError(f"{directory} is not a prepared data directory (no meta.json); run `griffon data prepare`")
    try:
        meta = json.loads(path.read_text())
        if not all(s in meta["splits"] for s in SPLITS) or not isinstance(meta["dtype"], str):
            raise KeyError("splits")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise DataError(f"{path} is corrupted or not a griffon data description ({e})") from None
    return meta
