"""The documents ``griffon eval`` scores, read as scoring goes: a prepared split's, or raw files'."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from griffon.data.loader import TokenSplit
from griffon.data.prepare import read_meta
from griffon.data.sources import DataError, check_input, iter_document_pieces
from griffon.data.tokenizers import Tokenizer


def eval_documents(
    tokenizer: Tokenizer,
    data: str | Path | None = None,
    split: str = "val",
    files: Sequence[str | Path] = (),
    field: str = "text",
) -> Iterator[Iterator[np.ndarray]]:
    """Each document as an iterator of pieces of token ids of ``tokenizer``: those of a prepared
    ``data`` directory's ``split`` (slices of its memory map), or of raw ``files`` (text read and
    tokenized a piece at a time, :func:`griffon.data.sources.iter_document_pieces`). The inputs are
    checked before a document is read."""
    if data:
        meta = read_meta(data)
        if meta["tokenizer"] != tokenizer.describe():
            raise DataError(f"{data} was prepared with another tokenizer ({meta['tokenizer']}) than the model's")
        tokens = TokenSplit.open(data, split)
        offsets = tokens.doc_offsets
        return (iter([tokens.tokens[offsets[i] : offsets[i + 1]]]) for i in range(tokens.n_docs))
    if not files:
        raise ValueError("give the documents to score: --data DIR, --text FILE... or --jsonl FILE...")
    for f in files:
        check_input(Path(f))
    return (
        (np.asarray(tokenizer.encode(piece), dtype=np.int64) for piece in pieces)
        for f in files
        for pieces in iter_document_pieces(f, field)
    )
