"""Reading examples from JSON Lines files, each line named where it is wrong."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from griffon.data.sources import DataError


def read_objects(path: str | Path) -> Iterator[tuple[str, dict]]:
    """Each non-blank line of ``path`` as a JSON object, with ``FILE:LINE`` to name it in errors;
    :class:`DataError` for a file that cannot be read or a line that is not a JSON object."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    for number, line in enumerate(lines, 1):
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
