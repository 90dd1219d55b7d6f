"""Reading examples from JSON Lines files, each line named where it is wrong."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from griffon.data.sources import DataError
from griffon.files import iter_lines


def read_objects(path: str | Path, what: str = "a JSONL file") -> Iterator[tuple[str, dict]]:
    """Each non-blank line of ``path`` as a JSON object, with ``FILE:LINE`` to name it in errors,
    streamed a bounded line at a time (:func:`griffon.files.iter_lines`);
    :class:`~griffon.files.FileError` for a file that cannot be read within its bounds,
    :class:`DataError` for a line that is not a JSON object."""
    path = Path(path)
    for number, line in iter_lines(path, what):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not JSON ({e})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{where}: an example is a JSON object")
        yield where, obj
