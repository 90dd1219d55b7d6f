"""The serving log: griffon's engine and server write to the ``griffon.serve`` logger, on stderr,
through a handler that survives a stream that cannot be written (a full disk, a closed pipe)."""

from __future__ import annotations

import logging
import multiprocessing
import sys

log = logging.getLogger("griffon.serve")


class _LogHandler(logging.StreamHandler):
    """The log on stderr, which may not be writable (a full disk, a closed pipe): the server then
    serves on without it, and says so once on stdout (where that can be written)."""

    failed = False

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr  # the current one (a test, or an embedding program, may replace it)
        super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        if self.failed or multiprocessing.parent_process() is not None:
            return  # said once, by the server's process (not again by its engine's)
        self.failed = True
        try:
            print("griffon serve: the log (stderr) cannot be written; serving on without it", flush=True)
        except Exception:
            pass


def configure_logging() -> logging.Logger:
    """Send griffon's server log (INFO and up) to stderr through a handler that survives a stream
    that cannot be written; returns the logger."""
    if not any(isinstance(h, _LogHandler) for h in log.handlers):
        handler = _LogHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("griffon serve: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    return log
