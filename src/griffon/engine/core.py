"""The serving engine: continuous batching over decode states, without HTTP.

Each :meth:`Engine.step` is one iteration: drop requests that were cancelled or timed out; prefill
waiting prompts in chunks, at most ``step_tokens`` prompt tokens per iteration so a long prompt
does not stall the others; then advance every running request by one token with one decode step
over the batch of their caches, and sample their next tokens in one call. The engine ties four
parts together, as vLLM separates them: the scheduler decides which requests prefill, how much,
and which run (:mod:`griffon.engine.scheduler`), the runner runs the model over chunks and the
batch's caches (:mod:`griffon.engine.runner`), the sampler draws every row's token at once
(:func:`griffon.decode.sampling.sample`), and the output processor turns tokens into text,
log-probabilities and reasons to stop (:mod:`griffon.engine.output`).

Exactly :func:`griffon.generate` for one prompt. A prompt is prefilled in chunks aligned to
multiples of ``prefill_chunk`` from its start (as :func:`griffon.decode.prefill` does with that
chunk; requests whose next chunks have the same length share one forward); its first token is
sampled from the prefill's last logits; each request samples with its own generator seeded from
its ``seed``; so its tokens do not depend on which requests share its batch or when they arrived
(to the float rounding of batched matmuls).

Failures stay with the request that caused them: an error in one request's sampling, scoring,
text or callback finishes that request with reason ``error`` and no other; a prefill forward that
fails for a group of requests is retried one request at a time, so only the one that fails alone
is failed. Only a failure of the batched decode forward fails its whole batch (their states may
be half-advanced).

Memory per request does not grow with its prompt beyond the prompt's ids (for models without
global attention): prefill runs a chunk at a time, the prefix cache shares one copy of a prompt's
tokens among its snapshots and gives one request at most a share of its bytes, and log-probabilities
are kept as arrays; :class:`~griffon.engine.limits.Limits` bounds the rest.

Thread safety: :meth:`submit` and :meth:`cancel` may be called from any thread; :meth:`step`
from one thread at a time (:class:`EngineThread` runs it in the background).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from griffon.data.tokenizers import Tokenizer
from griffon.decode.generate import length_limit
from griffon.decode.kernels import PARALLEL_MIN_ROWS
from griffon.decode.sampling import SamplingParams, adjust_logits, check_prompt, sample
from griffon.engine.limits import Limits
from griffon.engine.metrics import Metrics
from griffon.engine.output import OutputProcessor
from griffon.engine.prefix_cache import EMPTY, Prefix, PrefixCache
from griffon.engine.request import Request
from griffon.engine.runner import ModelRunner
from griffon.engine.scheduler import Scheduler
from griffon.model import Cache, Griffon

# Prompt tokens prefilled per engine iteration (``griffon serve --step-tokens``).
DEFAULT_STEP_TOKENS = 512
# Requests decoded together in the warm-up's second wave: enough for the fused step's parallel kernels.
WARM_UP_BATCH = PARALLEL_MIN_ROWS

log = logging.getLogger("griffon.serve")


@dataclass
class _Slot:
    """What the engine keeps for a request from its admission to its end."""

    cache: Cache | None = None  # while it prefills; then its row of the runner's batch holds it
    prefix: Prefix | None = None  # the prompt's tokens in ``cache``, for the prefix cache
    snapshot_bytes: int = 0  # bytes this request's snapshots took in the prefix cache
    last: torch.Tensor | None = None  # (1, V) logits after the prompt's tokens so far
    generator: torch.Generator | None = None


def check_request(
    prompt: list[int], params: SamplingParams, choices: int, vocab_size: int, max_len: int | None, limits: Limits,
    has_tokenizer: bool,
) -> None:  # fmt: skip
    """Raise ValueError if a request cannot run on an engine of this vocabulary, ``max_len``,
    limits and tokenizer: parameters out of range, an empty prompt, ids outside the vocabulary,
    longer than ``max_len``, stop strings without a tokenizer, or over a limit
    (:class:`~griffon.engine.limits.LimitExceeded`, naming it) with ``choices`` completions of the
    prompt."""
    params.validate()
    if not prompt:
        raise ValueError("the prompt is empty")
    limits.check(len(prompt), params.max_tokens, params.logprobs, params.echo, choices)
    check_prompt(prompt, vocab_size, max_len, params.max_tokens)
    for name, ids in (("stop_token_ids", params.stop_token_ids), ("logit_bias", [t for t, _ in params.logit_bias])):
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"{name}: token ids must lie in [0, {vocab_size}), got {bad[0]}")
    if params.stop and not has_tokenizer:
        raise ValueError("stop strings need a tokenizer; this engine has none (use stop_token_ids)")


class Engine:
    """Continuous batching for one model (see the module docstring).

    Args:
        model: the model, in eval mode on its device.
        tokenizer: for stop strings and EOS (``None``: token ids only).
        max_batch: requests prefilling or running at once.
        max_queue: requests waiting beyond those; :meth:`submit` raises :class:`QueueFull` past it.
        prefill_chunk: prompt tokens per prefill call; also the prefix cache's granularity.
        step_tokens: prompt tokens prefilled per iteration (at least one chunk).
        prefix_cache_bytes: bound of the prefix-state cache (0 turns it off).
        step: the decode step's name (:data:`griffon.decode.STEPS`).
        max_len: longest prompt + max_tokens accepted (default: the model's ``max_seq_len`` if any).
        limits: bounds on one request (prompt length, ``max_tokens``, log-probabilities, time).
    """

    def __init__(
        self,
        model: Griffon,
        tokenizer: Tokenizer | None = None,
        max_batch: int = 64,
        max_queue: int = 256,
        prefill_chunk: int = 256,
        step_tokens: int = DEFAULT_STEP_TOKENS,
        prefix_cache_bytes: int = 256 * 2**20,
        step: str = "auto",
        max_len: int | None = None,
        limits: Limits | None = None,
    ) -> None:
        self.scheduler = Scheduler(max_batch, max_queue, prefill_chunk, step_tokens)
        self.runner = ModelRunner(model, step)
        self.output = OutputProcessor(tokenizer)
        self.model = self.runner.model
        self.tokenizer = tokenizer
        self.device = self.runner.device
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self.max_len = max_len if max_len is not None else length_limit(model.config)
        self.limits = limits or Limits()
        self.prefix_cache = PrefixCache(prefix_cache_bytes, prefill_chunk) if prefix_cache_bytes > 0 else None
        self.metrics = Metrics()
        self.errors = 0  # requests failed by an error inside the engine (logged, with the traceback)
        self._ids = itertools.count()
        self._by_id: dict[str, Request] = {}
        self._slots: dict[str, _Slot] = {}  # the admitted requests' (counted in metrics.running)

    # ----- requests in ------------------------------------------------------------------------

    def check(self, prompt: list[int], params: SamplingParams, choices: int = 1) -> None:
        """Raise ValueError if this request cannot run (:func:`check_request`)."""
        check_request(prompt, params, choices, self.model.config.vocab_size, self.max_len, self.limits,
                      self.tokenizer is not None)  # fmt: skip

    def submit(
        self,
        prompt: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        timeout: float | None = None,
        notify: Callable[[Request], None] | None = None,
        arrival: float | None = None,
        bounded: bool = True,
        checked: bool = False,
    ) -> Request:
        """Queue a request; ``notify(request)`` is called (on the engine's thread) whenever it gets
        tokens or finishes. ``timeout`` (default: the limits' ``request_timeout``) counts from
        ``arrival`` (default: now; a front end's clock, ``time.monotonic``). Raises ValueError for
        a bad request (unless ``checked``: the caller has checked it with :meth:`check`),
        :class:`QueueFull` when ``max_queue`` requests wait, unless not ``bounded`` (a front end
        that bounds what it sends)."""
        if not checked:
            self.check(prompt, params)
        timeout = timeout if timeout is not None else self.limits.request_timeout
        with self.scheduler.lock:
            rid = request_id or f"req-{next(self._ids)}"
            if rid in self._by_id:
                raise ValueError(f"request id {rid!r} is in use")
            req = Request(rid, list(prompt), params, notify=notify)
            if arrival is not None:
                req.arrival = arrival
            if timeout is not None:
                req.deadline = req.arrival + timeout
            self.scheduler.enqueue(req, bounded)
            self._enqueued(req)
        return req

    def _enqueued(self, req: Request) -> None:
        """Set up a queued request's output (under the scheduler's lock, but for the warm-up's)."""
        self.output.open(req)
        self._by_id[req.id] = req
        self.metrics.queue_length = self.scheduler.queue_length

    def warm_up(self) -> float:
        """Run requests through every path a request may take (a prefill of a whole chunk and of
        part of one, prompt scoring, filtered sampling, the decode step alone and batched), so that
        kernels compiled on first use (numba's, ``torch.compile``'s, the first call of each op) are
        compiled before the first real request; then forget them (metrics, prefix cache, counters).
        Call before the engine serves. Returns the seconds it took.

        A ``compiled`` decode step compiles once per batch size: the sizes warmed here are 1 and
        :data:`WARM_UP_BATCH` (or ``max_batch`` if smaller)."""
        t0 = time.monotonic()
        n = self.prefill_chunk + 2
        if self.max_len is not None:
            n = max(min(n, self.max_len - 4), 1)
        g = torch.Generator().manual_seed(0)
        vocab = self.model.config.vocab_size
        sampled = SamplingParams(max_tokens=3, temperature=0.8, top_k=5, top_p=0.9, seed=0, logprobs=2)
        scored = SamplingParams(max_tokens=1, temperature=0.0, logprobs=2, echo=True)
        greedy = SamplingParams(max_tokens=3, temperature=0.0)
        try:
            for wave in ([sampled, scored], [greedy] * min(self.max_batch, WARM_UP_BATCH)):
                for params in wave:
                    req = Request(
                        f"warm-up-{next(self._ids)}", torch.randint(vocab, (n,), generator=g).tolist(), params
                    )
                    self.scheduler.enqueue(req, bounded=False)  # the warm-up's own
                    self._enqueued(req)
                self.run_until_done()
        finally:  # nothing of the warm-up stays, whether it finished or failed
            self.abort_all("cancelled")
            self.metrics = Metrics()
            self.errors = 0
            if self.prefix_cache is not None:
                self.prefix_cache = PrefixCache(self.prefix_cache.max_bytes, self.prefill_chunk)
        return time.monotonic() - t0

    def cancel(self, request_id: str) -> bool:
        """Stop a request (its slot is freed at the next iteration); False if it is unknown or done."""
        with self.scheduler.lock:
            req = self._by_id.get(request_id)
            if req is None or req.finished:
                return False
            req.cancelled = True
            return True

    # ----- the iteration ----------------------------------------------------------------------

    @property
    def queue_length(self) -> int:
        return self.scheduler.queue_length

    @property
    def num_running(self) -> int:
        return self.scheduler.in_flight

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    @torch.inference_mode()
    def step(self) -> None:
        """One iteration: expire, admit, prefill under the token budget, one decode step."""
        gone, rows = self.scheduler.expire(time.monotonic())
        self.runner.drop_rows(rows)
        for req, reason in gone:
            self._finish(req, reason)
        for req in self.scheduler.admit():
            self._slots[req.id] = _Slot()
            self.metrics.running += 1
            self._isolated(req, self._start_prefill, req)
        self.metrics.queue_length = self.scheduler.queue_length
        for group in self.scheduler.prefill_groups():
            self._prefill(group)
        if self.scheduler.running:
            self._decode()

    def abort_all(self, reason: str) -> None:
        """Finish every request in the engine with ``reason`` (at shutdown, or after an error
        inside :meth:`step` that no request could be blamed for)."""
        requests = self.scheduler.take_all()
        self.runner.clear()
        self.metrics.queue_length = 0
        for req in requests:
            if not req.finished:
                self._finish(req, reason)

    def run_until_done(self) -> None:
        """Iterate until every submitted request has finished (offline use and tests)."""
        while self.has_work():
            self.step()

    # ----- failures -----------------------------------------------------------------------------

    def _isolated(self, req: Request, fn: Callable, *args) -> None:
        """Run ``fn(*args)``, work on ``req`` alone; an exception fails ``req`` and nothing else."""
        try:
            fn(*args)
        except Exception as e:
            self._fail(req, e)

    def _fail(self, req: Request, error: Exception) -> None:
        """Finish ``req`` with reason ``error`` wherever it is (waiting for it is not), and log why."""
        self.errors += 1
        req.error = f"{type(error).__name__}: {error}"
        log.error("request %s failed inside the engine", req.id, exc_info=error)
        row = self.scheduler.remove(req)
        if row is not None:
            self.runner.drop_rows([row])
        if not req.finished:
            self._finish(req, "error")

    # ----- prefill ------------------------------------------------------------------------------

    def _start_prefill(self, req: Request) -> None:
        """A fresh cache for ``req``, or the longest cached prefix of its prompt."""
        slot, snapshot = self._slots[req.id], None
        if self.prefix_cache is not None:
            slot.prefix = EMPTY
            if not req.scores_prompt:
                snapshot = self.prefix_cache.lookup(req.prompt)
        if snapshot is None:
            slot.cache, req.prefilled = self.runner.new_cache(), 0
            return
        slot.cache, slot.last, slot.prefix = snapshot.cache, snapshot.logits, snapshot.prefix
        req.prefilled = req.cached_tokens = snapshot.prefix.end

    def _prefill(self, group: list[Request]) -> None:
        """Prefill the next chunk of every request in ``group``; if the forward fails, again one
        request at a time, so that only a request that fails on its own is failed."""
        if self.scheduler.next_chunk(group[0]) == 0:  # wholly restored from the prefix cache
            for req in group:
                self._isolated(req, self._finish_prefill, req)
            return
        try:
            logits, caches = self._forward_chunk(group)
        except Exception as e:
            if len(group) == 1:
                self._fail(group[0], e)
            else:
                for req in group:
                    self._prefill([req])
            return
        for req, row, cache in zip(group, logits, caches, strict=True):
            self._isolated(req, self._after_chunk, req, row, cache)

    def _forward_chunk(self, group: list[Request]) -> tuple[torch.Tensor, list[Cache]]:
        """The runner's forward over the next chunk (all of one length) of every request in
        ``group``: the logits (len(group), n or 1, V) and each request's advanced cache."""
        n = self.scheduler.next_chunk(group[0])
        return self.runner.prefill(
            [r.prompt[r.prefilled : r.prefilled + n] for r in group],
            [r.prefilled for r in group],
            [self._slots[r.id].cache for r in group],
            all_logits=group[0].scores_prompt,
        )

    def _after_chunk(self, req: Request, logits: torch.Tensor, cache: Cache) -> None:
        """Take a prefilled chunk into ``req``: its cache, scores, last logits, a prefix snapshot."""
        slot, n = self._slots[req.id], self.scheduler.next_chunk(req)
        start = req.prefilled
        slot.cache = cache
        if req.scores_prompt:
            self.output.score_prompt(req, logits, start, start + n)  # logits (n, V)
        req.prefilled += n
        slot.last = logits[-1:]  # (1, V)
        if slot.prefix is not None and req.prefilled % self.prefill_chunk == 0:
            slot.prefix = slot.prefix.extend(req.prompt[start : req.prefilled])
            allowance = self.prefix_cache.request_bytes - slot.snapshot_bytes
            taken = self.prefix_cache.insert(slot.prefix, slot.cache, slot.last, allowance)
            slot.snapshot_bytes += taken
            if not taken and slot.prefix.key not in self.prefix_cache:
                slot.prefix = None  # its share is spent: stop following its chunks
        if req.prefilled == len(req.prompt):
            self._finish_prefill(req)

    def _finish_prefill(self, req: Request) -> None:
        """The prompt is in the cache: sample the first token and join the running batch."""
        slot = self._slots[req.id]
        req.prompt_done = True
        slot.prefix = None
        self.metrics.prompt_tokens += len(req.prompt)
        if req.params.max_tokens == 0:  # echo only: the prompt's scores were the answer
            self.scheduler.remove(req)
            self._finish(req, "length")
            return
        slot.generator = torch.Generator(device=self.device)
        slot.generator.manual_seed(req.params.seed if req.params.seed is not None else torch.seed())
        last, slot.last = slot.last, None
        self._emit(req, self._sample(req, last), last)
        if req.finished:
            self.scheduler.remove(req)
        else:
            self.runner.join(slot.cache)
            self.scheduler.start_running(req)
        slot.cache = None

    # ----- decode -------------------------------------------------------------------------------

    def _sample(self, req: Request, logits: torch.Tensor) -> int:
        """One request's next token from its logits (1, V)."""
        return self._sample_batch([req], logits)[0]

    def _sample_batch(self, reqs: list[Request], logits: torch.Tensor) -> list[int]:
        """The requests' next tokens from their logits (B, V), in one call, after their penalties
        and biases (:func:`~griffon.decode.sampling.adjust_logits`)."""
        params = [r.params for r in reqs]
        logits = adjust_logits(logits, params, [r.prompt for r in reqs], [r.tokens for r in reqs], self.output.eos_id)
        return sample(logits, params, [self._slots[r.id].generator for r in reqs]).tolist()

    def _emit(self, req: Request, token: int, logits: torch.Tensor) -> None:
        """Append a generated token, sampled from ``logits`` (1, V); finish the request if it is done."""
        now = time.monotonic()
        if req.first_token_time is None:
            req.first_token_time = now
            self.metrics.observe_ttft(now - req.arrival)
        self.metrics.generation_tokens += 1
        reason = self.output.append(req, token, logits)
        if reason is not None:
            self._finish(req, reason)
        elif req.notify is not None:
            req.notify(req)

    def _decode(self) -> None:
        """One decode step over the running batch and every row's next token. A row whose
        sampling or output fails is failed alone, after the others have taken their tokens."""
        running = list(self.scheduler.running)
        try:
            logits = self.runner.decode([r.tokens[-1] for r in running])  # (B, V)
        except Exception as e:  # the batch's states may be half-advanced: every row fails
            for req in running:
                self._fail(req, e)
            return
        try:
            chosen: list[int] | None = self._sample_batch(running, logits)
        except Exception:  # sampled again row by row below, so that only a row that fails alone fails
            chosen = None
        failed = []
        for i, req in enumerate(running):
            row = logits[i : i + 1]
            try:
                self._emit(req, chosen[i] if chosen is not None else self._sample(req, row), row)
            except Exception as e:
                failed.append((req, e))
        done = [i for i, req in enumerate(running) if req.finished]
        self.scheduler.drop_rows(done)
        self.runner.drop_rows(done)
        for req, e in failed:
            self._fail(req, e)

    def _finish(self, req: Request, reason: str) -> None:
        now = time.monotonic()
        req.finish_time = now
        if req.first_token_time is not None and len(req.tokens) > 1:
            self.metrics.observe_tpot((now - req.first_token_time) / (len(req.tokens) - 1))
        self.metrics.requests[reason] = self.metrics.requests.get(reason, 0) + 1
        if (
            self._slots.pop(req.id, None) is not None
        ):  # before the request is released below: a reader never sees it running
            self.metrics.running -= 1
        req.finish_reason = reason
        with self.scheduler.lock:
            self._by_id.pop(req.id, None)
        if req.notify is not None:
            try:
                req.notify(req)
            except Exception:
                log.exception("the callback of request %s failed", req.id)


class EngineThread:
    """Runs :meth:`Engine.step` on a background thread while there is work; sleeps otherwise.
    Errors inside a step are the engine's to attribute (its module docstring); one that escapes
    a step finishes the requests in flight with reason ``error`` and the loop goes on (logged;
    ``errors`` counts them). :meth:`drain` bounds how long running requests may go on at shutdown."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._drain_deadline: float | None = None
        self.errors = 0
        self.last_beat = time.monotonic()
        """When the loop last went round (idle, it goes round every half second): a loop stuck in a
        step shows as silence while work is pending."""
        self._thread = threading.Thread(target=self._loop, name="griffon-engine", daemon=True)

    def start(self) -> EngineThread:
        self._thread.start()
        return self

    def wake(self) -> None:
        """Call after submitting or cancelling: the loop may be asleep."""
        self._wake.set()

    def drain(self, seconds: float) -> None:
        """Let the requests in the engine run for at most ``seconds`` more, then finish them with
        reason ``shutdown`` (their callers answer with what they have and a final event)."""
        self._drain_deadline = time.monotonic() + seconds
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join()

    def pending(self) -> bool:
        """Whether the engine holds requests that have not finished."""
        return self.engine.has_work()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.last_beat = time.monotonic()
            if self._drain_deadline is not None and time.monotonic() >= self._drain_deadline:
                self.engine.abort_all("shutdown")
            if not self.engine.has_work():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                self.engine.step()
            except Exception:  # a bad step must not take the server down with it
                self.errors += 1
                log.exception("an engine step failed; the requests in flight are failed")
                self.engine.abort_all("error")
