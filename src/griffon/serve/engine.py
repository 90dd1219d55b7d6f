"""The serving engine: continuous batching over decode states, without HTTP.

Each :meth:`Engine.step` is one iteration: drop requests that were cancelled or timed out; prefill
waiting prompts in chunks, at most ``step_tokens`` prompt tokens per iteration so a long prompt
does not stall the others; then advance every running request by one token with one decode step
(:func:`griffon.decode.make_step`) over the batch of their caches. A Griffin or Hawk cache has a
fixed size, so a request joins the batch (:meth:`Cache.stack`) or leaves it (:meth:`Cache.select`)
at the cost of copying a few states, and its slot is reused at once.

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
are kept as arrays; :class:`~griffon.serve.limits.Limits` bounds the rest.

Thread safety: :meth:`submit` and :meth:`cancel` may be called from any thread; :meth:`step`
from one thread at a time (:class:`EngineThread` runs it in the background).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from griffon.data.tokenizers import Tokenizer
from griffon.decode.generate import TextStream, length_limit
from griffon.decode.kernels import PARALLEL_MIN_ROWS
from griffon.decode.sampling import SamplingParams, check_prompt, sample
from griffon.decode.steps import make_step
from griffon.model import Cache, Griffon
from griffon.serve.limits import Limits
from griffon.serve.metrics import Metrics
from griffon.serve.prefix_cache import EMPTY, Prefix, PrefixCache

# Prompt tokens prefilled per engine iteration (``griffon serve --step-tokens``).
DEFAULT_STEP_TOKENS = 512
# Requests decoded together in the warm-up's second wave: enough for the fused step's parallel kernels.
WARM_UP_BATCH = PARALLEL_MIN_ROWS

log = logging.getLogger("griffon.serve")


def _log_softmax(logits: torch.Tensor) -> torch.Tensor:
    # float32 at least: bf16 logits would give log-probabilities good to 2-3 digits only
    return logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1)


class QueueFull(Exception):
    """The engine's waiting queue is at its bound; try again later."""


@dataclass
class TokenLogprob:
    """A token's log-probability under the model and the ``k`` most likely tokens' (id -> logprob)."""

    logprob: float
    top: dict[int, float]


class LogprobRows:
    """Log-probabilities of a run of tokens, one row per token: the token's own and the ``k`` most
    likely tokens' ids and values. Kept in growing arrays (16 bytes per entry), not one dict per
    token, so what a request keeps for ``logprobs`` and ``echo`` is small and counted."""

    def __init__(self, k: int) -> None:
        self.k = k
        self._n = 0
        self._chosen = np.empty(0, dtype=np.float64)
        self._ids = np.empty((0, k), dtype=np.int64)
        self._values = np.empty((0, k), dtype=np.float64)

    def __len__(self) -> int:
        return self._n

    def extend(self, logp: torch.Tensor, tokens: torch.Tensor) -> None:
        """Append the rows for log-probabilities ``logp`` (n, V) and the tokens taken ``tokens`` (n,)."""
        n = logp.shape[0]
        if self._n + n > len(self._chosen):
            size = max(2 * len(self._chosen), self._n + n, 16)
            self._chosen = np.resize(self._chosen, size)
            self._ids = np.resize(self._ids, (size, self.k))
            self._values = np.resize(self._values, (size, self.k))
        rows = slice(self._n, self._n + n)
        self._chosen[rows] = logp.gather(-1, tokens[:, None])[:, 0].double().cpu().numpy()
        if self.k:
            values, ids = torch.topk(logp, self.k, dim=-1)  # (n, k)
            self._ids[rows] = ids.cpu().numpy()
            self._values[rows] = values.double().cpu().numpy()
        self._n += n

    def rows(self, start: int, end: int) -> list[TokenLogprob]:
        """Rows [start, end) as :class:`TokenLogprob` (the top ones as a dict id -> logprob)."""
        return [
            TokenLogprob(
                float(self._chosen[i]), dict(zip(self._ids[i].tolist(), self._values[i].tolist(), strict=True))
            )
            for i in range(start, min(end, self._n))
        ]


@dataclass
class Request:
    """One completion request and, as it runs, its output. The engine appends to ``tokens`` (and
    ``logprobs``) and sets ``finish_reason`` last; readers on other threads may poll them."""

    id: str
    prompt: list[int]
    params: SamplingParams
    arrival: float = field(default_factory=time.monotonic)
    deadline: float | None = None
    notify: Callable[[Request], None] | None = None
    tokens: list[int] = field(default_factory=list)
    logprobs: LogprobRows | None = None  # of the generated tokens, with params.logprobs
    prompt_logprobs: LogprobRows | None = None  # of prompt tokens 1.. (nothing predicts the first), with echo
    prompt_done: bool = False  # the prompt is prefilled (and scored, with echo and logprobs)
    text: TextStream | None = None
    finish_reason: str | None = None  # "length", "stop", "cancelled", "timeout", "error", "shutdown"
    error: str | None = None  # what failed, with finish_reason "error"
    first_token_time: float | None = None
    finish_time: float | None = None
    cached_tokens: int = 0  # prompt tokens restored from the prefix cache
    _cancelled: bool = False
    _admitted: bool = False  # counted in metrics.running
    _cache: Cache | None = None
    _position: int = 0  # prompt tokens in _cache
    _prefix: Prefix | None = None  # the prompt's tokens in _cache, for the prefix cache
    _snapshot_bytes: int = 0  # bytes this request's snapshots took in the prefix cache
    _last: torch.Tensor | None = None  # (1, V) logits after them
    _generator: torch.Generator | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def logprob_entries(self, start: int, end: int) -> list[TokenLogprob | None]:
        """Output entries [start, end): with echo the prompt's tokens first (the first has none), then
        the generated tokens. Only entries computed so far are returned."""
        out: list[TokenLogprob | None] = []
        if self.params.echo and self.prompt_logprobs is not None:
            p = len(self.prompt)
            if start == 0 and end > 0:
                out.append(None)
            out += self.prompt_logprobs.rows(max(start, 1) - 1, min(end, p) - 1)
            start, end = max(start - p, 0), max(end - p, 0)
        if self.logprobs is not None:
            out += self.logprobs.rows(start, end)
        return out


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
        if max_batch < 1 or max_queue < 0 or prefill_chunk < 1 or step_tokens < 1:
            raise ValueError("max_batch, prefill_chunk and step_tokens must be >= 1, max_queue >= 0")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = model.embed.weight.device
        self.max_batch, self.max_queue = max_batch, max_queue
        self.prefill_chunk, self.step_tokens = prefill_chunk, step_tokens
        self.max_len = max_len if max_len is not None else length_limit(model.config)
        self.limits = limits or Limits()
        self.prefix_cache = PrefixCache(prefix_cache_bytes, prefill_chunk) if prefix_cache_bytes > 0 else None
        self.metrics = Metrics()
        self.errors = 0  # requests failed by an error inside the engine (logged, with the traceback)
        self._decode_step = make_step(model, step)
        self._lock = threading.Lock()
        self._waiting: deque[Request] = deque()
        self._prefilling: list[Request] = []
        self._running: list[Request] = []
        self._batch: Cache | None = None  # the running requests' caches, in their order
        self._ids = itertools.count()
        self._by_id: dict[str, Request] = {}

    # ----- requests in ------------------------------------------------------------------------

    def check(self, prompt: list[int], params: SamplingParams) -> None:
        """Raise ValueError if this request cannot run: parameters out of range, an empty prompt,
        ids outside the vocabulary, longer than ``max_len``, stop strings without a tokenizer, or
        over a limit (:class:`~griffon.serve.limits.LimitExceeded`, naming it)."""
        params.validate()
        if not prompt:
            raise ValueError("the prompt is empty")
        self.limits.check(len(prompt), params.max_tokens, params.logprobs, params.echo)
        check_prompt(prompt, self.model.config.vocab_size, self.max_len, params.max_tokens)
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this engine has none (use stop_token_ids)")

    def submit(
        self,
        prompt: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        timeout: float | None = None,
        notify: Callable[[Request], None] | None = None,
    ) -> Request:
        """Queue a request; ``notify(request)`` is called (on the engine's thread) whenever it gets
        tokens or finishes. ``timeout`` (default: the limits' ``request_timeout``) counts from now.
        Raises ValueError for a bad request, :class:`QueueFull` when full."""
        self.check(prompt, params)
        timeout = timeout if timeout is not None else self.limits.request_timeout
        with self._lock:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting")
            rid = request_id or f"req-{next(self._ids)}"
            if rid in self._by_id:
                raise ValueError(f"request id {rid!r} is in use")
            req = Request(rid, list(prompt), params, notify=notify)
            if timeout is not None:
                req.deadline = req.arrival + timeout
            self._enqueue(req)
        return req

    def _enqueue(self, req: Request) -> None:
        """Queue a checked request (under the lock, but for the warm-up's)."""
        if self.tokenizer is not None:  # the text so far, cut at the first stop string
            req.text = TextStream(self.tokenizer, req.params.stop)
        if req.params.logprobs is not None:
            req.logprobs = LogprobRows(req.params.logprobs)
            if req.params.echo:
                req.prompt_logprobs = LogprobRows(req.params.logprobs)
        self._by_id[req.id] = req
        self._waiting.append(req)
        self.metrics.queue_length = len(self._waiting)

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
                    prompt = torch.randint(vocab, (n,), generator=g).tolist()
                    self._enqueue(Request(f"warm-up-{next(self._ids)}", prompt, params))
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
        with self._lock:
            req = self._by_id.get(request_id)
            if req is None or req.finished:
                return False
            req._cancelled = True
            return True

    # ----- the iteration ----------------------------------------------------------------------

    @property
    def queue_length(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running) + len(self._prefilling)

    def has_work(self) -> bool:
        return bool(self._waiting or self._prefilling or self._running)

    @torch.inference_mode()
    def step(self) -> None:
        """One iteration: expire, admit, prefill under the token budget, one decode step."""
        now = time.monotonic()
        self._expire(now)
        with self._lock:
            while self._waiting and len(self._prefilling) + len(self._running) < self.max_batch:
                req = self._waiting.popleft()
                req._admitted = True
                self.metrics.running += 1
                self._prefilling.append(req)
            self.metrics.queue_length = len(self._waiting)
        for req in [r for r in self._prefilling if r._cache is None]:
            self._isolated(req, self._start_prefill, req)
        # Prefill under the token budget (at least one chunk), one forward per group of requests
        # whose next chunks have the same length and kind: fresh prompts of equal length go together.
        budget, groups = self.step_tokens, {}
        for req in list(self._prefilling):
            if budget <= 0:
                break
            n = self._next_chunk(req)
            budget -= n
            groups.setdefault((n, self._scores_prompt(req)), []).append(req)
        for group in groups.values():
            self._prefill(group)
        if self._running:
            self._decode()

    def abort_all(self, reason: str) -> None:
        """Finish every request in the engine with ``reason`` (at shutdown, or after an error
        inside :meth:`step` that no request could be blamed for)."""
        with self._lock:
            waiting, self._waiting = list(self._waiting), deque()
            self.metrics.queue_length = 0
        prefilling, running = self._prefilling, self._running
        self._prefilling, self._running, self._batch = [], [], None
        for req in [*waiting, *prefilling, *running]:
            if not req.finished:
                self._finish(req, reason)

    def run_until_done(self) -> None:
        """Iterate until every submitted request has finished (offline use and tests)."""
        while self.has_work():
            self.step()

    def _expire(self, now: float) -> None:
        def reason(r: Request) -> str | None:
            if r._cancelled:
                return "cancelled"
            if r.deadline is not None and now > r.deadline:
                return "timeout"
            return None

        with self._lock:
            expired = [r for r in self._waiting if reason(r)]
            for r in expired:
                self._waiting.remove(r)
            self.metrics.queue_length = len(self._waiting)
        for r in expired:
            self._finish(r, reason(r))
        for r in [r for r in self._prefilling if reason(r)]:
            self._prefilling.remove(r)
            self._finish(r, reason(r))
        gone = [i for i, r in enumerate(self._running) if reason(r)]
        for i in gone:
            self._finish(self._running[i], reason(self._running[i]))
        self._drop_rows(gone)

    # ----- failures -----------------------------------------------------------------------------

    def _isolated(self, req: Request, fn: Callable, *args) -> None:
        """Run ``fn(*args)``, work on ``req`` alone; an exception fails ``req`` and nothing else."""
        try:
            fn(*args)
        except Exception as e:
            self._fail(req, e)

    def _record(self, req: Request, error: Exception) -> None:
        self.errors += 1
        req.error = f"{type(error).__name__}: {error}"
        log.error("request %s failed inside the engine", req.id, exc_info=error)

    def _fail(self, req: Request, error: Exception) -> None:
        """Finish ``req`` with reason ``error`` wherever it is, and log why."""
        self._record(req, error)
        if req in self._prefilling:
            self._prefilling.remove(req)
        if req in self._running:
            i = self._running.index(req)
            self._finish(req, "error")
            self._drop_rows([i])
        elif not req.finished:
            self._finish(req, "error")

    # ----- prefill ------------------------------------------------------------------------------

    @staticmethod
    def _scores_prompt(req: Request) -> bool:
        return req.params.echo and req.params.logprobs is not None

    def _start_prefill(self, req: Request) -> None:
        """A fresh cache for ``req``, or the longest cached prefix of its prompt."""
        snapshot = None
        if self.prefix_cache is not None:
            req._prefix = EMPTY
            if not self._scores_prompt(req):
                snapshot = self.prefix_cache.lookup(req.prompt)
        if snapshot is None:
            req._cache, req._position = self.model.init_cache(1), 0
            return
        req._cache, req._position, req._last = snapshot.cache, snapshot.prefix.end, snapshot.logits
        req._prefix = snapshot.prefix
        req.cached_tokens = req._position

    def _next_chunk(self, req: Request) -> int:
        """Tokens of ``req``'s next prefill chunk: up to the next multiple of ``prefill_chunk``."""
        start = req._position
        return min(len(req.prompt), (start // self.prefill_chunk + 1) * self.prefill_chunk) - start

    def _prefill(self, group: list[Request]) -> None:
        """Prefill the next chunk of every request in ``group``; if the forward fails, again one
        request at a time, so that only a request that fails on its own is failed."""
        if self._next_chunk(group[0]) == 0:  # wholly restored from the prefix cache
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
        """The forward over the next chunk (all of one length) of every request in ``group``: the
        logits (len(group), n or 1, V) and each request's advanced cache. Changes no request, but
        for the cache of a group of one, which the forward consumes."""
        n = self._next_chunk(group[0])
        tokens = torch.tensor([r.prompt[r._position : r._position + n] for r in group], device=self.device)
        segment_pos = torch.stack([torch.arange(r._position, r._position + n, device=self.device) for r in group])
        cache = group[0]._cache if len(group) == 1 else Cache.stack([r._cache for r in group])
        logits, cache = self.model(tokens, segment_pos, cache=cache, last_only=not self._scores_prompt(group[0]))
        if len(group) == 1:
            return logits, [cache]
        return logits, [cache.select(torch.tensor([i], device=self.device)) for i in range(len(group))]

    def _after_chunk(self, req: Request, logits: torch.Tensor, cache: Cache) -> None:
        """Take a prefilled chunk into ``req``: its cache, scores, last logits, a prefix snapshot."""
        n = self._next_chunk(req)
        start = req._position
        req._cache = cache
        if self._scores_prompt(req):
            self._score_prompt(req, logits, start, start + n)  # logits (n, V)
        req._position += n
        req._last = logits[-1:]  # (1, V)
        if req._prefix is not None and req._position % self.prefill_chunk == 0:
            req._prefix = req._prefix.extend(req.prompt[start : req._position])
            allowance = self.prefix_cache.request_bytes - req._snapshot_bytes
            taken = self.prefix_cache.insert(req._prefix, req._cache, req._last, allowance)
            req._snapshot_bytes += taken
            if not taken and req._prefix.key not in self.prefix_cache:
                req._prefix = None  # its share is spent: stop following its chunks
        if req._position == len(req.prompt):
            self._finish_prefill(req)

    def _finish_prefill(self, req: Request) -> None:
        """The prompt is in the cache: sample the first token and join the running batch."""
        self._prefilling.remove(req)
        req.prompt_done = True
        req._prefix = None
        self.metrics.prompt_tokens += len(req.prompt)
        if req.params.max_tokens == 0:  # echo only: the prompt's scores were the answer
            self._finish(req, "length")
            return
        req._generator = torch.Generator(device=self.device)
        req._generator.manual_seed(req.params.seed if req.params.seed is not None else torch.seed())
        last, req._last = req._last, None
        self._emit(req, self._sample(req, last), last)
        if not req.finished:
            self._batch = req._cache if self._batch is None else Cache.stack([self._batch, req._cache])
            self._running.append(req)
        req._cache = None

    def _score_prompt(self, req: Request, logits: torch.Tensor, start: int, end: int) -> None:
        """Log-probabilities of the prompt's tokens predicted by the logits (T, V) at positions
        start .. end-1: position t predicts token t+1; nothing predicts the first token."""
        end = min(end, len(req.prompt) - 1)
        if end > start:
            targets = torch.tensor(req.prompt[start + 1 : end + 1], device=logits.device)
            req.prompt_logprobs.extend(_log_softmax(logits[: end - start]), targets)

    # ----- decode -------------------------------------------------------------------------------

    def _sample(self, req: Request, logits: torch.Tensor) -> int:
        """One request's next token from its logits (1, V)."""
        return int(sample(logits, [req.params], [req._generator])[0])

    def _sample_batch(self, reqs: list[Request], logits: torch.Tensor) -> list[int]:
        """The running requests' next tokens from their logits (B, V), in one call."""
        return sample(logits, [r.params for r in reqs], [r._generator for r in reqs]).tolist()

    def _emit(self, req: Request, token: int, logits: torch.Tensor) -> None:
        """Append a generated token; decide whether the request is done."""
        now = time.monotonic()
        if req.first_token_time is None:
            req.first_token_time = now
            self.metrics.observe_ttft(now - req.arrival)
        if req.logprobs is not None:
            req.logprobs.extend(_log_softmax(logits), torch.tensor([token], device=logits.device))
        req.tokens.append(token)
        self.metrics.generation_tokens += 1
        p = req.params
        eos_id = None if self.tokenizer is None else self.tokenizer.eos_id
        is_eos = eos_id is not None and token == eos_id and not p.ignore_eos
        if req.text is not None and token != eos_id:  # the EOS token has no text
            req.text.push(token)
        if is_eos or token in p.stop_token_ids or (req.text is not None and req.text.done):
            self._finish(req, "stop")
        elif len(req.tokens) >= p.max_tokens:
            self._finish(req, "length")
        elif req.notify is not None:
            req.notify(req)

    def _decode(self) -> None:
        tokens = torch.tensor([r.tokens[-1] for r in self._running], device=self.device)
        try:
            logits = self._decode_step(tokens, self._batch)  # (B, V)
        except Exception as e:  # the batch's states may be half-advanced: every row fails
            for req in list(self._running):
                self._fail(req, e)
            return
        try:
            chosen: list[int] | None = self._sample_batch(self._running, logits)
        except Exception:  # sampled again row by row below, so that only a row that fails alone fails
            chosen = None
        done = []
        for i, req in enumerate(self._running):
            row = logits[i : i + 1]
            try:
                self._emit(req, chosen[i] if chosen is not None else self._sample(req, row), row)
            except Exception as e:  # this row alone: the others' tokens are already theirs
                self._record(req, e)
                if not req.finished:
                    self._finish(req, "error")
            if req.finished:
                done.append(i)
        self._drop_rows(done)

    def _drop_rows(self, rows: list[int]) -> None:
        if not rows:
            return
        gone = set(rows)
        keep = [i for i in range(len(self._running)) if i not in gone]
        self._running = [self._running[i] for i in keep]
        self._batch = self._batch.select(torch.tensor(keep, device=self.device)) if keep else None

    def _finish(self, req: Request, reason: str) -> None:
        now = time.monotonic()
        req.finish_time = now
        req._cache = req._prefix = req._last = None
        if req.first_token_time is not None and len(req.tokens) > 1:
            self.metrics.observe_tpot((now - req.first_token_time) / (len(req.tokens) - 1))
        self.metrics.requests[reason] = self.metrics.requests.get(reason, 0) + 1
        if req._admitted:  # counted before the request is released below, so a reader never sees it running
            req._admitted = False
            self.metrics.running -= 1
        req.finish_reason = reason
        with self._lock:
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

    def _loop(self) -> None:
        while not self._stop.is_set():
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
