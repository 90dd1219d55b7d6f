"""What a front end holds to run requests on the engine, wherever the engine runs (as vLLM v1's
``EngineCoreClient`` with its in-process and multiprocess forms): :class:`EngineClient`, with
:class:`InprocClient` (the engine's loop on a thread of the caller's process) and
:class:`~griffon.engine.process.EngineProcess` (the engine in a process of its own). A front end
(the HTTP server, a benchmark) talks to the interface alone and never asks which one it has.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable

from griffon.data.tokenizers import Tokenizer
from griffon.decode.sampling import SamplingParams
from griffon.engine.core import Engine, EngineThread
from griffon.engine.limits import Limits
from griffon.engine.metrics import Metrics
from griffon.engine.request import Request

log = logging.getLogger("griffon.serve")


class EngineClient(ABC):
    """An engine as a front end sees it: requests in (:meth:`check`, :meth:`submit`, :meth:`cancel`),
    each a :class:`~griffon.engine.request.Request` that grows as the engine works and calls its
    ``notify``; its life (:meth:`start`, :meth:`wait_ready`, :meth:`drain`, :meth:`stop`); and what
    health and metrics report (:attr:`dead`, :attr:`last_beat`, :meth:`pending`, :attr:`metrics`,
    :attr:`errors`, :meth:`prefix_stats`)."""

    tokenizer: Tokenizer | None
    """The engine's tokenizer, on the front end's side (None: token ids only)."""
    warm_up_seconds: float = 0.0
    last_beat: float
    """When the engine's loop was last heard from (monotonic seconds): silence while requests are
    pending means it is stuck."""

    @property
    def dead(self) -> str | None:
        """Why the engine is gone, once it is (an engine on a thread of this process goes with it)."""
        return None

    @abstractmethod
    def start(self) -> None:
        """Start the engine (once; again is a no-op): requests may be submitted when this returns,
        its warm-up may go on (:meth:`wait_ready`). Raises RuntimeError if the engine cannot start."""

    @abstractmethod
    def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait until the warm-up is over; whether the engine is ready (not gone)."""

    @abstractmethod
    def pending(self) -> bool:
        """Whether submitted requests have not finished (read without a lock: the engine may hang)."""

    @abstractmethod
    def check(self, prompt: list[int], params: SamplingParams, choices: int = 1) -> None:
        """Raise ValueError if this request cannot run (:func:`~griffon.engine.core.check_request`)."""

    @abstractmethod
    def submit(
        self,
        prompt: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        timeout: float | None = None,
        notify: Callable[[Request], None] | None = None,
        checked: bool = False,
    ) -> Request:
        """Queue a request; ValueError for a bad one, :class:`~griffon.engine.request.QueueFull`
        when the engine holds all it may. ``checked``: the caller has checked it with
        :meth:`check`, which is not done again (a request is validated once)."""

    @abstractmethod
    def cancel(self, request_id: str) -> bool:
        """Stop a request; False if it is unknown or done."""

    @abstractmethod
    def wake(self) -> None:
        """Call after submitting or cancelling: an engine that sleeps when idle may need waking."""

    @abstractmethod
    def drain(self, seconds: float) -> None:
        """Let the requests in the engine run for at most ``seconds`` more, then finish them with
        reason ``shutdown``."""

    @abstractmethod
    def stop(self) -> None:
        """Stop the engine (its requests finish with reason ``shutdown``)."""

    @property
    @abstractmethod
    def max_batch(self) -> int: ...

    @property
    @abstractmethod
    def max_queue(self) -> int: ...

    @property
    @abstractmethod
    def limits(self) -> Limits: ...

    @property
    @abstractmethod
    def metrics(self) -> Metrics: ...

    @property
    @abstractmethod
    def errors(self) -> int:
        """Errors inside the engine and its loop (logged with their tracebacks)."""

    @abstractmethod
    def prefix_stats(self) -> tuple[int, int]:
        """The prefix cache's lookups and hits (0, 0 without one)."""


class InprocClient(EngineClient):
    """The engine's loop on a thread of this process (:class:`~griffon.engine.core.EngineThread`),
    after a warm-up on a thread of its own (with ``warm_up``)."""

    def __init__(self, engine: Engine, warm_up: bool = True) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.warm_up = warm_up
        self.thread = EngineThread(engine)
        self._ready = threading.Event()
        self._started = False

    @property
    def last_beat(self) -> float:  # type: ignore[override]
        return self.thread.last_beat

    def start(self) -> None:
        if self._started:
            return
        self._started = True

        def run() -> None:
            try:
                if self.warm_up:
                    self.warm_up_seconds = self.engine.warm_up()
                    log.info("warmed up in %.1f s", self.warm_up_seconds)
            except Exception:
                log.exception("the warm-up failed; serving without it")
            self.thread.last_beat = time.monotonic()
            self.thread.start()
            self._ready.set()

        threading.Thread(target=run, name="griffon-warm-up", daemon=True).start()

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    def pending(self) -> bool:
        return self.engine.has_work()

    def check(self, prompt: list[int], params: SamplingParams, choices: int = 1) -> None:
        self.engine.check(prompt, params, choices=choices)

    def submit(self, prompt, params, request_id=None, timeout=None, notify=None, checked=False) -> Request:
        return self.engine.submit(prompt, params, request_id=request_id, timeout=timeout, notify=notify,
                                  checked=checked)  # fmt: skip

    def cancel(self, request_id: str) -> bool:
        return self.engine.cancel(request_id)

    def wake(self) -> None:
        self.thread.wake()

    def drain(self, seconds: float) -> None:
        self.thread.drain(seconds)

    def stop(self) -> None:
        if not self._started:
            return
        self._ready.wait()
        self.thread.stop()

    @property
    def max_batch(self) -> int:
        return self.engine.max_batch

    @property
    def max_queue(self) -> int:
        return self.engine.max_queue

    @property
    def limits(self) -> Limits:
        return self.engine.limits

    @property
    def metrics(self) -> Metrics:
        return self.engine.metrics

    @property
    def errors(self) -> int:
        return self.engine.errors + self.thread.errors

    def prefix_stats(self) -> tuple[int, int]:
        cache = self.engine.prefix_cache
        return (cache.lookups, cache.hits) if cache is not None else (0, 0)
