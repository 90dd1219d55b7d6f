"""Atomic writes: a reader, or a crash, sees a file or directory whole or not at all.

Everything griffon writes that another command reads later (checkpoints, run state, prepared
data, converted models) goes through these helpers: written under a temporary ``.tmp_*`` name
beside its destination, then renamed, with the modes the user's umask gives.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

TEMP_PREFIX = ".tmp_"
TRASH_PREFIX = ".trash_"


def _default_mode(directory: bool) -> int:
    """The mode ``open``/``mkdir`` would give a new file or directory under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def _temp_name(final: Path) -> str:
    return f"{TEMP_PREFIX}{final.name}_"


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it over ``path``.

    A crash leaves either the old file or the new one, never a half-written file (and perhaps a
    ``.tmp_*`` file, which :func:`remove_leftovers` deletes). The file gets the umask's mode.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=_temp_name(path), dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, _default_mode(directory=False))  # mkstemp makes 0600 files
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_savefig(fig, path: str | Path, dpi: int = 120) -> None:
    """Save a matplotlib figure through :func:`atomic_write`, in the format its suffix names."""
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format=path.suffix[1:] or "png", dpi=dpi))


@contextmanager
def atomic_directory(final: str | Path) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``final``; when the block completes it is renamed
    to ``final`` (replacing an existing ``final``), when it raises it is removed.

    Readers see the whole directory or none of it. A crash leaves a ``.tmp_*`` directory, or
    while replacing a ``.trash_*`` one, which :func:`remove_leftovers` deletes. Directory and
    files get the modes the umask gives.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_name(final), dir=final.parent))
    try:
        yield tmp
        dir_mode, file_mode = _default_mode(directory=True), _default_mode(directory=False)
        for p in tmp.rglob("*"):
            os.chmod(p, dir_mode if p.is_dir() else file_mode)
        os.chmod(tmp, dir_mode)  # mkdtemp makes 0700 directories
        if final.exists():
            remove_tree(final)
        tmp.rename(final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def remove_tree(path: Path) -> None:
    """Delete a directory: renamed to ``.trash_*`` first, so a crash midway never leaves a
    half-deleted directory under its real name."""
    trash = Path(tempfile.mkdtemp(prefix=f"{TRASH_PREFIX}{path.name}_", dir=path.parent))
    path.rename(trash / path.name)
    shutil.rmtree(trash)


def remove_leftovers(directory: Path) -> list[Path]:
    """Delete the temporary and half-deleted files and directories that :func:`atomic_write`,
    :func:`atomic_directory` and :func:`remove_tree` leave in ``directory`` when killed; return them."""
    found = sorted(p for p in directory.glob(".*") if p.name.startswith((TEMP_PREFIX, TRASH_PREFIX)))
    for p in found:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)
    return found


def describe_os_error(e: BaseException) -> str:
    """One line for a failed file operation: a full disk named as such, whichever library noticed
    it (safetensors reports it in its own words), else the OS's message and the paths involved."""
    if getattr(e, "errno", None) == errno.ENOSPC or "No space left" in str(e) or "StorageFull" in str(e):
        return "no space left on device"
    if isinstance(e, OSError) and e.strerror:
        where = " ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
        return f"{e.strerror}: {where}" if where else e.strerror
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def atomic_write_json(path: str | Path, obj: object) -> None:
    """Write ``obj`` as indented JSON to ``path`` through :func:`atomic_write`."""
    text = json.dumps(obj, indent=2) + "\n"
    atomic_write(Path(path), lambda tmp: tmp.write_text(text))
