"""Reading documents from text, JSONL (optionally gzipped), parquet and HF datasets saved to disk."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path

from griffon.files import DOCUMENT_LINE_BYTES, bounded_lines


class DataError(ValueError):
    """Input data is missing, empty or malformed. The message names the file."""


def iter_documents(path: str | Path, field: str = "text") -> Iterator[str]:
    """Yield the documents of one input: a ``.txt`` file is one document; ``.jsonl``/``.jsonl.gz``
    and ``.parquet`` have one per row (column ``field``); a directory saved by
    ``datasets.Dataset.save_to_disk`` has one per row; any other directory is a tree of text files,
    one document each (sorted by path; hidden files and files that are not UTF-8 are skipped)."""
    path = Path(path)
    check_input(path)
    name = path.name
    if path.is_dir() and not any((path / f).is_file() for f in HF_DATASET_FILES):
        yield from _text_tree(path)
    elif path.is_dir():
        yield from _hf_dataset(path, field)
    elif name.endswith((".jsonl", ".jsonl.gz", ".json.gz", ".ndjson")):
        yield from _jsonl(path, field)
    elif name.endswith(".parquet"):
        yield from _parquet(path, field)
    elif name.endswith((".txt", ".md", ".text")) or "." not in name:
        data = path.read_bytes()
        try:
            yield data.decode("utf-8")
        except UnicodeDecodeError as e:
            line = data[: e.start].count(b"\n") + 1
            raise DataError(f"{path}:{line}: not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start})") from None
    else:
        raise DataError(f"{path}: unsupported input (use .txt, .jsonl[.gz], .parquet or a saved HF dataset directory)")


HF_DATASET_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")
# Text files are read this many bytes at a time by iter_document_pieces.
PIECE_BYTES = 4 * 2**20


def check_input(path: Path) -> None:
    """Raise :class:`DataError` unless ``path`` is a regular file or a directory."""
    if not path.exists():
        raise DataError(f"input not found: {path}")
    if not (path.is_file() or path.is_dir()):
        raise DataError(f"{path} is not a regular file or a directory (a device, a FIFO or a socket?); give a file")


def _is_text_file(path: Path) -> bool:
    return path.is_file() and (path.name.endswith((".txt", ".md", ".text")) or "." not in path.name)


def iter_document_pieces(path: str | Path, field: str = "text") -> Iterator[Iterator[str]]:
    """The documents of one input, as :func:`iter_documents` reads them, each an iterator of text
    pieces: a text file is read :data:`PIECE_BYTES` at a time, cut after its last line break (or,
    in a longer line, at a character boundary), so a document of any size is held a piece at a
    time; a document of any other input is one piece."""
    path = Path(path)
    check_input(path)
    if _is_text_file(path):
        yield _text_pieces(path)
        return
    for document in iter_documents(path, field):
        yield iter([document])


def _text_pieces(path: Path) -> Iterator[str]:
    rest, line, offset = b"", 1, 0
    try:
        with path.open("rb") as f:
            while block := f.read(PIECE_BYTES):
                data = rest + block
                cut = data.rfind(b"\n") + 1
                if cut == 0:  # one long line: cut before its last character, which may be incomplete
                    cut = len(data)
                    while cut > max(len(data) - 3, 0) and data[cut - 1] & 0xC0 == 0x80:  # continuation bytes
                        cut -= 1
                    if cut > 0 and data[cut - 1] >= 0xC0:  # the lead byte of a multi-byte character
                        cut -= 1
                piece, rest = data[:cut], data[cut:]
                yield _decode(piece, path, line, offset)
                line, offset = line + piece.count(b"\n"), offset + len(piece)
            if rest:
                yield _decode(rest, path, line, offset)
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}") from None


def _decode(data: bytes, path: Path, line: int, offset: int) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line += data[: e.start].count(b"\n")
        raise DataError(
            f"{path}:{line}: not UTF-8 text (byte {data[e.start]:#04x} at offset {offset + e.start})"
        ) from None


def _text_tree(root: Path) -> Iterator[str]:
    files = sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    for path in files:
        try:
            yield path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            continue


def _jsonl(path: Path, field: str) -> Iterator[str]:
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            for lineno, raw in bounded_lines(f, path, "a document", DOCUMENT_LINE_BYTES):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{path}:{lineno}: not UTF-8 text (byte {raw[e.start]:#04x})") from None
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: invalid JSON: {e}") from None
                if not isinstance(row, dict) or not isinstance(row.get(field), str):
                    raise DataError(f"{path}:{lineno}: expected an object with a string field {field!r}")
                yield row[field]
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read {path}: {e}") from None


def _parquet(path: Path, field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("reading parquet needs `pip install pyarrow`") from None
    table = pq.read_table(path)
    if field not in table.column_names:
        raise DataError(f"{path}: no column {field!r} (columns: {table.column_names})")
    for value in table.column(field).to_pylist():
        if isinstance(value, str):
            yield value


def _hf_dataset(path: Path, field: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path} is a directory: reading a saved HF dataset needs `pip install datasets`") from None
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise DataError(f"cannot load HF dataset from {path}: {e}") from None
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    if field not in ds.column_names:
        raise DataError(f"{path}: no column {field!r} (columns: {ds.column_names})")
    for value in ds[field]:
        if isinstance(value, str):
            yield value
