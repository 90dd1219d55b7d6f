"""The engine in a process of its own, as vLLM v1 runs its EngineCore: the HTTP server in one
process, the model's loop in another, a pipe between them.

Why: in one process the engine's thread and the server's event loop share one GIL, so the Python
work of answering (parsing bodies, building and serialising events, writing sockets) holds up the
loop that feeds the model, whose threads then idle; and the engine's own Python work (sampling,
bookkeeping, detokenising) holds up the answers. Apart, each has an interpreter of its own.

What crosses the pipe (pickled, one message at a time):

* server to core: ``("submit", id, prompt, params, arrival, timeout)``, ``("cancel", id)``,
  ``("drain", seconds)``, ``("stop",)``;
* core to server: ``("loaded", info)`` once the engine is built, ``("ready", seconds)`` after its
  warm-up, then after every iteration that changed something ``("out", updates, stats)``: for each
  request it touched an :class:`Update` (its new tokens, the new part of its visible text, new
  log-probability rows, and at the end its finish reason), and now and then the engine's metrics;
  and ``("beat",)`` whenever it has sent nothing for :data:`BEAT_EVERY` seconds, so that a core that
  stops answering (a deadlock, a stuck native call, SIGSTOP) is told from a busy one by its silence
  (``last_beat``).

On the front end's side :class:`EngineProcess` is an :class:`~griffon.engine.client.EngineClient`:
``submit`` returns a :class:`~griffon.engine.request.Request` that a reader thread keeps up to date from the
updates, calling its ``notify`` as the engine would. The text is detokenised in the core (stop strings
decide when a request ends, so they belong with the tokens); what crosses is the text that is safe
to show. Admission: the server refuses a request (:class:`QueueFull`) when ``max_batch + max_queue``
of its requests are unfinished, the same bound on what the engine holds; the core's own queue is
unbounded. If the core dies, its requests finish with reason ``error`` and the server stops
taking new ones.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from griffon.data.tokenizers import Tokenizer
from griffon.decode.sampling import SamplingParams
from griffon.engine.client import EngineClient
from griffon.engine.core import Engine, check_request
from griffon.engine.limits import Limits
from griffon.engine.metrics import Metrics
from griffon.engine.request import LogprobRows, QueueFull, Request

log = logging.getLogger("griffon.serve")

# Seconds between metrics sent while nothing finishes (a finished request always sends them).
STATS_EVERY = 0.25
# Seconds the core sleeps on its pipe when it has nothing to do.
IDLE_POLL = 0.5
# Seconds of silence after which the core sends a heartbeat (it answers between engine steps).
BEAT_EVERY = 1.0
# Seconds to wait for the core to build its engine, warm up, or stop.
START_TIMEOUT = 600.0
STOP_TIMEOUT = 30.0

Rows = tuple[np.ndarray, np.ndarray, np.ndarray]


class Update(NamedTuple):
    """What changed in one request during an iteration (fields as :class:`Request`'s)."""

    id: str
    tokens: list[int]
    text: str  # new visible text
    logprobs: Rows | None  # new rows
    prompt_logprobs: Rows | None
    prompt_done: bool
    cumulative_logprob: float
    cached_tokens: int
    first_token_time: float | None
    finish_time: float | None
    finish_reason: str | None
    error: str | None


@dataclass
class EngineInfo:
    """What the server needs to know of the engine to check requests before sending them."""

    vocab_size: int
    max_len: int | None
    limits: Limits
    max_batch: int
    max_queue: int
    has_tokenizer: bool
    pid: int


@dataclass
class Stats:
    """The engine's counters as of an iteration, for ``/metrics`` and ``/health``."""

    metrics: Metrics
    prefix_lookups: int = 0
    prefix_hits: int = 0
    errors: int = 0


class SentText:
    """A request's text on the server's side: what the core has declared safe to show so far, all
    of it once the request has finished (the interface of :class:`~griffon.decode.generate.TextStream`
    that the server reads)."""

    def __init__(self) -> None:
        self.text = ""

    def visible(self, final: bool = False) -> str:
        return self.text


# ----- the core's side -------------------------------------------------------------------------


class _Sent:
    """How much of a request's output has been sent: tokens, text characters, log-probability rows."""

    __slots__ = ("tokens", "text", "logprobs", "prompt_logprobs")

    def __init__(self) -> None:
        self.tokens = self.text = self.logprobs = self.prompt_logprobs = 0


class _Core:
    """The loop in the core's process: take messages, step the engine, send what changed."""

    def __init__(self, engine: Engine, conn) -> None:
        self.engine = engine
        self.conn = conn
        self.touched: dict[str, Request] = {}
        self.sent: dict[str, _Sent] = {}
        self.loop_errors = 0
        self.drain_deadline: float | None = None
        self.last_stats = 0.0
        self.last_sent = 0.0
        self.stats_due = False

    def send(self, message: tuple) -> None:
        self.conn.send(message)
        self.last_sent = time.monotonic()

    def notify(self, req: Request) -> None:
        self.touched[req.id] = req

    def handle(self, message: tuple) -> bool:
        """Act on one message from the server; False for ``stop``."""
        kind = message[0]
        if kind == "submit":
            _, rid, prompt, params, arrival, timeout = message
            self.sent[rid] = _Sent()
            try:
                # The server bounds what it sends (max_batch + max_queue unfinished); requests the
                # core has not admitted yet may briefly be more than max_queue (admission happens
                # at the next step). Its clock is the server's (monotonic is system-wide): TTFT
                # counts the pipe.
                self.engine.submit(prompt, params, request_id=rid, timeout=timeout, notify=self.notify,
                                   arrival=arrival, bounded=False, checked=True)  # fmt: skip
            except Exception as e:  # an engine that refuses it after all fails the request
                req = Request(rid, prompt, params, finish_reason="error", error=f"{type(e).__name__}: {e}")
                self.touched[rid] = req
                return True
        elif kind == "cancel":
            self.engine.cancel(message[1])
        elif kind == "drain":
            self.drain_deadline = time.monotonic() + message[1]
        elif kind == "stop":
            return False
        return True

    def run(self) -> None:
        engine = self.engine
        while True:
            timeout = 0.0 if engine.has_work() else IDLE_POLL
            while self.conn.poll(timeout):
                if not self.handle(self.conn.recv()):
                    engine.abort_all("shutdown")
                    self.flush(force_stats=True)
                    return
                timeout = 0.0
            if self.drain_deadline is not None and time.monotonic() >= self.drain_deadline:
                engine.abort_all("shutdown")
            if engine.has_work():
                try:
                    engine.step()
                except Exception:  # as EngineThread: a bad step must not take the server down
                    self.loop_errors += 1
                    log.exception("an engine step failed; the requests in flight are failed")
                    engine.abort_all("error")
                self.stats_due = True
            self.flush()
            if time.monotonic() - self.last_sent >= BEAT_EVERY:
                self.send(("beat",))

    def update(self, req: Request) -> Update:
        sent = self.sent[req.id]
        tokens = req.tokens[sent.tokens :]
        sent.tokens = len(req.tokens)
        text = ""
        if req.text is not None:
            visible = req.text.visible(final=req.finished)
            text, sent.text = visible[sent.text :], len(visible)
        rows = []
        for name in ("logprobs", "prompt_logprobs"):
            table: LogprobRows | None = getattr(req, name)
            start = getattr(sent, name)
            if table is None or len(table) == start:
                rows.append(None)
                continue
            rows.append(table.arrays(start))
            setattr(sent, name, len(table))
        if req.finished:
            del self.sent[req.id]
        return Update(req.id, tokens, text, rows[0], rows[1], req.prompt_done, req.cumulative_logprob,
                      req.cached_tokens, req.first_token_time, req.finish_time, req.finish_reason, req.error)  # fmt: skip

    def flush(self, force_stats: bool = False) -> None:
        """Send the iteration's updates; the metrics with them when a request finished, every
        :data:`STATS_EVERY` seconds while work goes on, and once more when it stops."""
        updates = [self.update(r) for r in self.touched.values()]
        self.touched.clear()
        now = time.monotonic()
        finished = any(u.finish_reason is not None for u in updates)
        send_stats = force_stats or finished or (self.stats_due and now - self.last_stats >= STATS_EVERY)
        send_stats = send_stats or (self.stats_due and not self.engine.has_work())
        if not updates and not send_stats:
            return
        stats = None
        if send_stats:
            cache = self.engine.prefix_cache
            stats = Stats(self.engine.metrics, cache.lookups if cache else 0, cache.hits if cache else 0,
                          self.engine.errors + self.loop_errors)  # fmt: skip
            self.last_stats, self.stats_due = now, False
        self.send(("out", updates, stats))


def _core_main(build: Callable[[], Engine], conn, warm_up: bool) -> None:
    """The core process: build the engine, warm it up, serve the pipe until ``stop`` or until the
    server goes away (the pipe closes)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the server decides
    try:
        engine = build()
    except Exception as e:
        conn.send(("failed", f"{type(e).__name__}: {e}" if not isinstance(e, ValueError) else str(e)))
        return
    info = EngineInfo(engine.model.config.vocab_size, engine.max_len, engine.limits, engine.max_batch,
                      engine.max_queue, engine.tokenizer is not None, os.getpid())  # fmt: skip
    conn.send(("loaded", info))
    seconds = 0.0
    if warm_up:
        try:
            seconds = engine.warm_up()
        except Exception:
            log.exception("the warm-up failed; serving without it")
    conn.send(("ready", seconds))
    try:
        _Core(engine, conn).run()
    except (EOFError, OSError, BrokenPipeError):
        pass  # the server is gone


# ----- the server's side -----------------------------------------------------------------------


class EngineProcess(EngineClient):
    """An engine built by ``build`` (a picklable callable: it runs in the new process) in a process
    of its own; see the module docstring. ``tokenizer`` is the engine's, loaded again on the
    server's side for prompts and token strings (``None``: ids only)."""

    def __init__(self, build: Callable[[], Engine], tokenizer: Tokenizer | None, warm_up: bool = True) -> None:
        self.build = build
        self.tokenizer = tokenizer
        self.warm_up = warm_up
        self.info: EngineInfo | None = None
        self.stats = Stats(Metrics())
        self.warm_up_seconds = 0.0
        self._dead: str | None = None  # why the core is gone, once it is
        self.last_beat = time.monotonic()  # when the core was last heard from
        self._ids = itertools.count()
        self._requests: dict[str, Request] = {}
        self._lock = threading.Lock()
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._ready = threading.Event()
        self._stopping = False
        self._process = None
        self._conn = None

    # ----- life ------------------------------------------------------------------------------

    @property
    def dead(self) -> str | None:
        return self._dead

    def start(self) -> None:
        """Start the core and wait until its engine is built (its warm-up goes on: :meth:`wait_ready`).
        Raises RuntimeError with the core's one-line reason if it cannot build the engine."""
        if self.info is not None:
            return
        ctx = multiprocessing.get_context("spawn")  # no inherited threads or CUDA context
        self._conn, child = ctx.Pipe()
        self._process = ctx.Process(target=_core_main, args=(self.build, child, self.warm_up), name="griffon-engine",
                                    daemon=True)  # fmt: skip
        self._process.start()
        child.close()
        kind, value = self._receive_start()
        if kind != "loaded":
            self._process.join(STOP_TIMEOUT)
            raise RuntimeError(f"the engine process could not start: {value}")
        self.info = value
        threading.Thread(target=self._send_loop, name="griffon-engine-send", daemon=True).start()
        threading.Thread(target=self._read_loop, name="griffon-engine-read", daemon=True).start()

    def _receive_start(self) -> tuple[str, object]:
        if not self._conn.poll(START_TIMEOUT):
            self._process.kill()
            return "failed", f"no answer within {START_TIMEOUT:.0f} s"
        try:
            return self._conn.recv()
        except EOFError:
            return "failed", f"{self._exit_status()} (see its log above)"

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait until the core's warm-up is over (or it died); whether it is ready."""
        ready = self._ready.wait(timeout) and self._dead is None
        if ready:
            log.info("engine process %d warmed up in %.1f s", self.pid, self.warm_up_seconds)
        return ready

    def wake(self) -> None:
        """Nothing to do: the core watches its pipe."""

    def drain(self, seconds: float) -> None:
        """Let the requests in the engine run for at most ``seconds`` more, then finish them with
        reason ``shutdown``."""
        self._outbox.put(("drain", seconds))

    def stop(self) -> None:
        """Stop the core (its requests finish with reason ``shutdown``) and wait for it."""
        if self._process is None:
            return
        self._stopping = True
        self._outbox.put(("stop",))
        self._process.join(STOP_TIMEOUT)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def pending(self) -> bool:
        """Whether requests sent to the core have not finished (lock-free: read while it may hang)."""
        return bool(self._requests)

    def _exit_status(self) -> str:
        """How the core ended, once it has (it is reaped here: no zombie is left)."""
        self._process.join(STOP_TIMEOUT)
        code = self._process.exitcode
        if code is None:
            return "its pipe closed while it still runs"
        if code < 0:
            try:
                return f"it was killed by signal {signal.Signals(-code).name}"
            except ValueError:
                return f"it was killed by signal {-code}"
        return f"it exited with code {code}"

    # ----- requests --------------------------------------------------------------------------

    @property
    def max_queue(self) -> int:
        return self.info.max_queue

    @property
    def max_batch(self) -> int:
        return self.info.max_batch

    @property
    def limits(self) -> Limits:
        return self.info.limits

    @property
    def metrics(self) -> Metrics:
        return self.stats.metrics

    @property
    def errors(self) -> int:
        return self.stats.errors

    def prefix_stats(self) -> tuple[int, int]:
        return self.stats.prefix_lookups, self.stats.prefix_hits

    def check(self, prompt: list[int], params: SamplingParams, choices: int = 1) -> None:
        """Raise ValueError if this request cannot run (:func:`~griffon.engine.core.check_request`)."""
        i = self.info
        check_request(prompt, params, choices, i.vocab_size, i.max_len, i.limits, i.has_tokenizer)

    def submit(
        self,
        prompt: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        timeout: float | None = None,
        notify: Callable[[Request], None] | None = None,
        checked: bool = False,
    ) -> Request:
        """Queue a request in the core (as :meth:`Engine.submit`): the returned request grows as the
        core's updates arrive, and ``notify(request)`` is called (on the reader thread) after each.
        It is checked here (unless ``checked``), not again in the core."""
        if not checked:
            self.check(prompt, params)
        if self._dead is not None:
            raise RuntimeError(f"the engine process is gone: {self._dead}")
        timeout = timeout if timeout is not None else self.info.limits.request_timeout
        with self._lock:
            if len(self._requests) >= self.info.max_batch + self.info.max_queue:
                raise QueueFull
            rid = request_id or f"req-{next(self._ids)}"
            if rid in self._requests:
                raise ValueError(f"request id {rid!r} is in use")
            req = Request(rid, list(prompt), params, notify=notify)
            if self.tokenizer is not None:
                req.text = SentText()
            if params.logprobs is not None:
                req.logprobs = LogprobRows(params.logprobs)
                if params.echo:
                    req.prompt_logprobs = LogprobRows(params.logprobs)
            self._requests[rid] = req
        self._outbox.put(("submit", rid, req.prompt, params, req.arrival, timeout))
        return req

    def cancel(self, request_id: str) -> bool:
        """Ask the core to stop a request; False if it is unknown here or done."""
        with self._lock:
            req = self._requests.get(request_id)
        if req is None or req.finished:
            return False
        self._outbox.put(("cancel", request_id))
        return True

    # ----- the pipe ----------------------------------------------------------------------------

    def _send_loop(self) -> None:
        """Messages to the core, sent from a thread of their own so the event loop never blocks on
        a full pipe (a long prompt, a core busy in a step)."""
        while True:
            message = self._outbox.get()
            try:
                self._conn.send(message)
            except (OSError, ValueError):
                return
            if message[0] == "stop":
                return

    def _read_loop(self) -> None:
        try:
            while True:
                kind, *rest = self._conn.recv()
                self.last_beat = time.monotonic()
                if kind == "ready":
                    self.warm_up_seconds = rest[0]
                    self._ready.set()
                elif kind == "out":
                    self._apply(*rest)
        except (EOFError, OSError):
            if not self._stopping:
                self._died(self._exit_status())
        finally:
            self._ready.set()

    def _apply(self, updates: list[Update], stats: Stats | None) -> None:
        if stats is not None:
            stats.metrics._recent = self.stats.metrics._recent  # the rate's window spans snapshots
            self.stats = stats
        for u in updates:
            with self._lock:
                req = self._requests.get(u.id)
                if req is not None and u.finish_reason is not None:
                    del self._requests[u.id]
            if req is None:
                continue
            req.tokens.extend(u.tokens)
            if u.text:
                req.text.text += u.text
            if u.logprobs is not None:
                req.logprobs.extend_arrays(*u.logprobs)
            if u.prompt_logprobs is not None:
                req.prompt_logprobs.extend_arrays(*u.prompt_logprobs)
            req.prompt_done, req.cumulative_logprob, req.cached_tokens = (
                u.prompt_done,
                u.cumulative_logprob,
                u.cached_tokens,
            )
            req.first_token_time, req.finish_time, req.error = u.first_token_time, u.finish_time, u.error
            req.finish_reason = u.finish_reason  # last: a reader that sees it finished sees all of it
            self._notify(req)

    def _died(self, why: str) -> None:
        self._dead = why
        log.error("the engine process is gone (%s); its requests are failed", why)
        with self._lock:
            orphans, self._requests = list(self._requests.values()), {}
        for req in orphans:
            req.error = f"the engine process is gone: {why}"
            req.finish_time = time.monotonic()
            req.finish_reason = "error"
            self._notify(req)

    @staticmethod
    def _notify(req: Request) -> None:
        if req.notify is None:
            return
        try:
            req.notify(req)
        except Exception:
            log.exception("the callback of request %s failed", req.id)
