"""Stopping a run cleanly on SIGINT (Ctrl-C) or SIGTERM (a scheduler's preemption notice).

The first signal only sets a flag; the training loop looks at it between optimizer steps, saves
a checkpoint and stops, so no step is cut in half (an interrupted ``optimizer.step()`` would leave
some parameters updated and others not). A second Ctrl-C interrupts at once, as usual.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(Exception):
    """Training stopped on SIGINT or SIGTERM after saving a checkpoint; the message says where."""


class StopRequest:
    """Catches SIGINT and SIGTERM while it lives (main thread only); :attr:`requested` says
    whether one arrived. :meth:`restore` puts the previous handlers back."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in _SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops at once

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
