"""Files a user names, read within a bound fitting what each file is.

Every file option goes through here: the file must be a regular file (a device such as
``/dev/zero`` never ends and a FIFO blocks whoever opens it, so both are refused before reading),
whole files are read only up to a size bound (an API key: kilobytes; a chat template: a megabyte;
a config: a few megabytes), and JSON Lines are streamed a line at a time with a bounded line length,
so a file of any size costs the memory of one line. Lines are split on ``\\n`` only: JSON strings
may hold U+2028, U+2029 or U+0085 unescaped (``json.dumps(..., ensure_ascii=False)`` writes them),
which ``str.splitlines`` would take for line breaks. Every refusal is one line naming the file and
the bound (:class:`FileError`).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

KEY_BYTES = 16 * 2**10
"""An API key file."""
TEMPLATE_BYTES = 2**20
"""A chat template (Jinja) and the tokenizer configuration that may carry one."""
CONFIG_BYTES = 16 * 2**20
"""A JSON config: a model or training config, a sweep spec, a converted checkpoint's config."""
LINE_BYTES = 16 * 2**20
"""One line of a JSON Lines file: an example, a prompt, a scored completion."""
DOCUMENT_LINE_BYTES = 256 * 2**20
"""One line of a corpus's JSON Lines: a whole document (a book is a few megabytes)."""


class FileError(ValueError):
    """A file a user named cannot be read within its bound; the message names the file."""


def _size(n: int) -> str:
    if n >= 2**20 and n % 2**20 == 0:
        return f"{n // 2**20} MiB"
    return f"{n // 2**10} KiB" if n >= 2**10 and n % 2**10 == 0 else f"{n} bytes"


@contextmanager
def open_regular(path: str | Path, what: str) -> Iterator[BinaryIO]:
    """``path`` opened for reading in binary, if it is a regular file. Opened without blocking and
    checked on the open descriptor, so a FIFO neither blocks nor slips in between check and open."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise FileError(f"cannot read {what} {path}: {e.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file (a device, a FIFO or a socket?)"
            raise FileError(f"{what} {path} is {kind}; give a regular file")
        os.set_blocking(fd, True)
        f = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with f:
        yield f


def read_bytes(path: str | Path, limit: int, what: str) -> bytes:
    """The whole of a regular file of at most ``limit`` bytes."""
    with open_regular(path, what) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise FileError(f"{what} {path} is larger than {_size(limit)}, the bound for {what}s")
    return data


def read_text(path: str | Path, limit: int, what: str) -> str:
    """The whole of a regular UTF-8 text file of at most ``limit`` bytes."""
    data = read_bytes(path, limit, what)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise FileError(f"{path}:{line}: {what} is not UTF-8 text (byte {data[e.start]:#04x})") from None


def read_json(path: str | Path, limit: int, what: str):
    """A JSON document in a regular file of at most ``limit`` bytes."""
    text = read_text(path, limit, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise FileError(f"{path}:{e.lineno}: {what} is not JSON ({e.msg})") from None


def bounded_lines(f: BinaryIO, path: str | Path, what: str, max_line: int) -> Iterator[tuple[int, bytes]]:
    """Each line of an open binary file with its number (from 1), ``\\n`` included, read at most
    ``max_line`` bytes (and its newline) at a time: a longer line is refused, naming ``path`` and the line."""
    for number, raw in enumerate(iter(lambda: f.readline(max_line + 1), b""), 1):
        if len(raw) > max_line and not (len(raw) == max_line + 1 and raw.endswith(b"\n")):
            raise FileError(f"{path}:{number}: the line is longer than {_size(max_line)}, the bound for {what}")
        yield number, raw


def iter_lines(path: str | Path, what: str, max_line: int = LINE_BYTES) -> Iterator[tuple[int, str]]:
    """Each line of a regular UTF-8 text file with its number (from 1), streamed, split on ``\\n``
    only (a ``\\r`` before it dropped), each at most ``max_line`` bytes."""
    with open_regular(path, what) as f:
        for number, raw in bounded_lines(f, path, what, max_line):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise FileError(f"{path}:{number}: not UTF-8 text (byte {raw[e.start]:#04x})") from None
            yield number, line.removesuffix("\n").removesuffix("\r")


def sha256(path: str | Path, what: str = "a file") -> str:
    """The SHA-256 of a regular file, read a block at a time."""
    digest = hashlib.sha256()
    with open_regular(path, what) as f:
        while block := f.read(2**22):
            digest.update(block)
    return digest.hexdigest()
