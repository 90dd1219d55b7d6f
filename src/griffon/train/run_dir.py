"""The run directory: one trainer at a time, and what makes a directory a run.

A run directory becomes a run when its ``config.json`` is written, which the trainer does last,
after validating everything and preparing data; until then it holds nothing ``--resume`` or a
new ``--out`` would trip over. While a trainer works on it, it holds an exclusive OS lock on
``RUN/.lock`` (``flock``): the kernel releases it when the process exits, however it exits, so a
killed trainer never leaves a stale lock, and a second trainer is refused with the holder's name.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path
from types import TracebackType

from griffon.atomic import remove_leftovers

CONFIG_NAME = "config.json"
LOCK_NAME = ".lock"


class RunLockedError(RuntimeError):
    """Another process is training this run."""


class RunLock:
    """Exclusive, non-blocking lock on a run directory for the life of the holder (a context manager)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "unknown process"
            os.close(fd)
            raise RunLockedError(
                f"{self.path.parent} is being trained by another process ({holder}); wait for it to end or stop it"
            ) from None
        os.ftruncate(fd, 0)
        os.write(
            fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode()
        )
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the lock
            self._fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.release()


def holds_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a run (its config.json was written)."""
    return (run_dir / CONFIG_NAME).is_file()


def clean_run_dir(run_dir: Path) -> list[Path]:
    """Remove what interrupted writes left in the run directory and its checkpoints folder."""
    found = remove_leftovers(run_dir)
    if (run_dir / "checkpoints").is_dir():
        found += remove_leftovers(run_dir / "checkpoints")
    return found
