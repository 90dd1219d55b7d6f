"""A training run's directory: its layout, its lock, and which checkpoint a resume continues from.

Layout of ``RUN/``::

    config.json             the run's TrainConfig, written last: its presence makes the directory a run
    tokenizer.json [.model] the tokenizer of the run's data
    data/                   a raw corpus, prepared for the run (absent when data.path is prepared)
    log.jsonl, log.csv      one record per logged step, evaluation and skipped step
    loss.png, tensorboard/  the loss curves
    checkpoints/step_N/     checkpoints, N zero-padded to six digits (griffon.train.state writes them)
    auto.json               model=auto's plan: the candidates, the law and the machine it chose with
    moe_load.png            a mixture of experts' load on each expert against steps
    reference_logps.safetensors  DPO's and QRPO's reference log-probabilities, computed once at the start
    chat_template.jinja     the chat template the run was trained with (and tokenizer_config.json's BOS and EOS)
    result.json             a sweep's run: its final figures, once it is done
    .lock                   held by the process training the run

While a trainer works on a run it holds an exclusive OS lock on ``.lock`` (``flock``): the kernel
releases it when the process exits, however it exits, so a killed trainer never leaves a stale
lock, and a second trainer is refused with the holder's name.
"""

from __future__ import annotations

import fcntl
import os
import re
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import TypeVar

from griffon.atomic import atomic_write, remove_leftovers
from griffon.config import ConfigError

CHECKPOINT_NAME = re.compile(r"step_(\d+)")
T = TypeVar("T")


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupted or does not match its config. The message says which part."""


class RunLockedError(RuntimeError):
    """Another process is training this run."""


def checkpoint_name(step: int) -> str:
    """The name griffon gives a run's checkpoint at ``step``."""
    return f"step_{step:06d}"


def checkpoint_step(path: Path) -> int | None:
    """The step of a checkpoint directory named as griffon names them (``step_`` and digits only,
    not a link), else None: a user's ``step_000010_keep_this`` or ``step_zz_backup`` is not one."""
    match = CHECKPOINT_NAME.fullmatch(path.name)
    if match is None or path.is_symlink() or not path.is_dir():
        return None
    return int(match.group(1))


class Run:
    """The directory of one training run (the module docstring gives its layout)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.config = self.root / "config.json"
        self.data = self.root / "data"
        self.log = self.root / "log.jsonl"
        self.log_csv = self.root / "log.csv"
        self.plot = self.root / "loss.png"
        self.tensorboard = self.root / "tensorboard"
        self.auto_plan = self.root / "auto.json"
        self.moe_plot = self.root / "moe_load.png"
        self.reference_logps = self.root / "reference_logps.safetensors"
        self.result = self.root / "result.json"
        self.checkpoints_dir = self.root / "checkpoints"
        self.lock_file = self.root / ".lock"

    @classmethod
    def of_checkpoint(cls, path: Path) -> Run | None:
        """The run whose checkpoints folder holds ``path`` (``RUN/checkpoints/*``), else None."""
        run = cls(path.parent.parent)
        return run if path.parent == run.checkpoints_dir else None

    def __repr__(self) -> str:
        return f"Run({str(self.root)!r})"

    def exists(self) -> bool:
        """Whether the directory holds a run (its ``config.json`` was written)."""
        return self.config.is_file()

    def check_new(self) -> None:
        """Refuse to start a new run where one already is."""
        if self.exists():
            raise ConfigError(
                f"{self.root} already holds a run; continue it with --resume {self.root} or pick another --out"
            )

    def check_resumable(self) -> None:
        """Refuse to resume where no run is."""
        if not self.exists():
            raise ConfigError(f"{self.root} holds no run (no config.json) to resume")

    def write_config(self, text: str) -> None:
        """Write ``config.json`` atomically (last, when the run starts: it makes the directory a run)."""
        atomic_write(self.config, lambda tmp: tmp.write_text(text))

    def lock(self) -> RunLock:
        """The run's exclusive lock (a context manager)."""
        return RunLock(self.lock_file)

    def clean(self) -> list[Path]:
        """Remove what interrupted writes left in the run directory and its checkpoints folder."""
        found = remove_leftovers(self.root) if self.root.is_dir() else []
        if self.checkpoints_dir.is_dir():
            found += remove_leftovers(self.checkpoints_dir)
        return found

    def checkpoint(self, step: int) -> Path:
        """Where the checkpoint of ``step`` is (or will be) written."""
        return self.checkpoints_dir / checkpoint_name(step)

    def checkpoints(self) -> list[Path]:
        """The run's checkpoint directories, oldest (lowest step) first: exactly those griffon
        writes (:func:`checkpoint_step`); whether one is complete, loading checks. A ``checkpoints``
        that is a symbolic link is refused: griffon creates the folder, and would otherwise write
        into, and prune, a directory it does not own."""
        root = self.checkpoints_dir
        if root.is_symlink():
            raise CheckpointError(
                f"{root} is a symbolic link; griffon keeps a run's checkpoints in a folder of its own there "
                "(move the link away, or copy what it points to in its place)"
            )
        if not root.is_dir():
            return []
        found = [(step, p) for p in root.iterdir() if (step := checkpoint_step(p)) is not None]
        return [p for _, p in sorted(found)]

    def newest_checkpoint(self) -> Path | None:
        ckpts = self.checkpoints()
        return ckpts[-1] if ckpts else None

    def resume_point(self, name: str | None) -> Path | None:
        """The checkpoint a resume continues from: ``name`` (one of the run's own, else an error
        listing them), else the newest; None when the run has none yet."""
        ckpts = self.checkpoints()
        if name is None:
            return ckpts[-1] if ckpts else None
        chosen = self.checkpoints_dir / Path(name).name
        if chosen not in ckpts:  # griffon's own names only: a user's copy beside them is not one
            names = ", ".join(p.name for p in ckpts) or "none"
            raise CheckpointError(f"{self.root} has no checkpoint {name!r} (it has: {names})")
        return chosen

    def resume(self, name: str | None, load: Callable[[Path], T], is_main: bool = True) -> T | None:
        """Load the checkpoint to resume from (:meth:`resume_point`) with ``load``; None when there
        is none yet (the run starts from step 0).

        A checkpoint that does not load (``load`` raises :class:`CheckpointError`) is an error that
        names the newest older one that does; once the chosen one has loaded, the newer ones are
        renamed ``discarded_step_*`` (kept for inspection, never resumed: the run continues from
        the chosen one). Only the main process (``is_main``) writes or speaks."""
        chosen = self.resume_point(name)
        if chosen is None:
            if is_main:
                sys.stderr.write(f"{self.root} has no checkpoint yet: starting it from step 0\n")
            return None
        ckpts = self.checkpoints()
        try:
            loaded = load(chosen)
        except CheckpointError as e:
            for p in reversed(ckpts[: ckpts.index(chosen)]):
                try:
                    load(p)
                except CheckpointError:
                    continue
                raise CheckpointError(
                    f"{e}; checkpoint {p.name} loads: resume from it with --resume {self.root} --checkpoint {p.name}"
                ) from None
            raise
        if is_main:
            for newer in ckpts[ckpts.index(chosen) + 1 :]:
                newer.rename(_unused(newer.with_name(f"discarded_{newer.name}")))
        return loaded


class RunLock:
    """Exclusive, non-blocking lock on a run directory for the life of the holder (a context manager)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
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


def _unused(path: Path) -> Path:
    """``path``, or ``path.1``, ``path.2``, ...: the first name not taken (never overwrite)."""
    candidate, n = path, 0
    while candidate.exists() or candidate.is_symlink():
        n += 1
        candidate = path.with_name(f"{path.name}.{n}")
    return candidate
