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

Thread safety: :meth:`submit` and :meth:`cancel` may be called from any thread; :meth:`step`
from one thread at a time (:class:`EngineThread` runs it in the background).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from griffon.data.tokenizers import Tokenizer
from griffon.decode.generate import TextStream, sample_next
from griffon.decode.steps import make_step
from griffon.model import Cache, Griffon
from griffon.serve.metrics import Metrics
from griffon.serve.prefix_cache import PrefixCache

MAX_LOGPROBS = 20


def _log_softmax(logits: torch.Tensor) -> torch.Tensor:
    # float32 at least: bf16 logits would give log-probabilities good to 2-3 digits only
    return logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1)


class QueueFull(Exception):
    """The engine's waiting queue is at its bound; try again later."""


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples and when it stops (OpenAI's completion parameters)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()  # stop strings: generation ends before the first (needs a tokenizer)
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # log-probabilities of the chosen token and this many top ones
    echo: bool = False  # with logprobs: also score the prompt's tokens

    def validate(self) -> None:
        """Raise ValueError naming the first parameter out of range."""
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {self.max_tokens}")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens = 0 generates nothing; it is allowed only with echo")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 (or unset), got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must lie in [0, {MAX_LOGPROBS}], got {self.logprobs}")


@dataclass
class TokenLogprob:
    """A token's log-probability under the model and the ``k`` most likely tokens' (id -> logprob)."""

    logprob: float
    top: dict[int, float]


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
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)
    text: TextStream | None = None
    finish_reason: str | None = None  # "length", "stop", "cancelled", "timeout"
    first_token_time: float | None = None
    finish_time: float | None = None
    cached_tokens: int = 0  # prompt tokens restored from the prefix cache
    _cancelled: bool = False
    _cache: Cache | None = None
    _position: int = 0  # prompt tokens in _cache
    _last: torch.Tensor | None = None  # (1, V) logits after them
    _generator: torch.Generator | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


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
    """

    def __init__(
        self,
        model: Griffon,
        tokenizer: Tokenizer | None = None,
        max_batch: int = 64,
        max_queue: int = 256,
        prefill_chunk: int = 256,
        step_tokens: int = 1024,
        prefix_cache_bytes: int = 256 * 2**20,
        step: str = "auto",
        max_len: int | None = None,
    ) -> None:
        if max_batch < 1 or max_queue < 0 or prefill_chunk < 1 or step_tokens < 1:
            raise ValueError("max_batch, prefill_chunk and step_tokens must be >= 1, max_queue >= 0")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = model.embed.weight.device
        self.max_batch, self.max_queue = max_batch, max_queue
        self.prefill_chunk, self.step_tokens = prefill_chunk, step_tokens
        self.max_len = max_len if max_len is not None else model.config.max_seq_len
        self.prefix_cache = PrefixCache(prefix_cache_bytes, prefill_chunk) if prefix_cache_bytes > 0 else None
        self.metrics = Metrics()
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
        """Raise ValueError if this request cannot run: empty prompt, ids outside the vocabulary,
        parameters out of range, stop strings without a tokenizer, longer than ``max_len``."""
        params.validate()
        if not prompt:
            raise ValueError("the prompt is empty")
        vocab = self.model.config.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise ValueError(f"prompt token ids must lie in [0, {vocab})")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this engine has none (use stop_token_ids)")
        if self.max_len is not None and len(prompt) + params.max_tokens > self.max_len:
            raise ValueError(
                f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) exceeds the model's "
                f"limit of {self.max_len} tokens"
            )

    def submit(
        self,
        prompt: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        timeout: float | None = None,
        notify: Callable[[Request], None] | None = None,
    ) -> Request:
        """Queue a request; ``notify(request)`` is called (on the engine's thread) whenever it gets
        tokens or finishes. Raises ValueError for a bad request, :class:`QueueFull` when full."""
        self.check(prompt, params)
        with self._lock:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting")
            rid = request_id or f"req-{next(self._ids)}"
            if rid in self._by_id:
                raise ValueError(f"request id {rid!r} is in use")
            req = Request(rid, list(prompt), params, notify=notify)
            if timeout is not None:
                req.deadline = req.arrival + timeout
            if self.tokenizer is not None:  # the text so far, cut at the first stop string
                req.text = TextStream(self.tokenizer, params.stop)
            self._by_id[rid] = req
            self._waiting.append(req)
        return req

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
                self._start_prefill(req)
                self._prefilling.append(req)
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
            self._prefill_group(group)
        if self._running:
            self._decode()
        self.metrics.queue_length = len(self._waiting)
        self.metrics.running = self.num_running

    def abort_all(self, reason: str) -> None:
        """Finish every request in the engine with ``reason`` (after an error inside :meth:`step`)."""
        with self._lock:
            waiting, self._waiting = list(self._waiting), deque()
        for req in [*waiting, *self._prefilling, *self._running]:
            if not req.finished:
                self._finish(req, reason)
        self._prefilling, self._running, self._batch = [], [], None

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
        for r in expired:
            self._finish(r, reason(r))
        for r in [r for r in self._prefilling if reason(r)]:
            self._prefilling.remove(r)
            self._finish(r, reason(r))
        gone = [i for i, r in enumerate(self._running) if reason(r)]
        for i in gone:
            self._finish(self._running[i], reason(self._running[i]))
        self._drop_rows(gone)

    @staticmethod
    def _scores_prompt(req: Request) -> bool:
        return req.params.echo and req.params.logprobs is not None

    def _start_prefill(self, req: Request) -> None:
        """A fresh cache for ``req``, or the longest cached prefix of its prompt."""
        snapshot = None
        if self.prefix_cache is not None and not self._scores_prompt(req):
            snapshot = self.prefix_cache.lookup(req.prompt)
        if snapshot is None:
            req._cache, req._position = self.model.init_cache(1), 0
            return
        req._cache, req._position, req._last = snapshot.cache, len(snapshot.tokens), snapshot.logits
        req.cached_tokens = req._position

    def _next_chunk(self, req: Request) -> int:
        """Tokens of ``req``'s next prefill chunk: up to the next multiple of ``prefill_chunk``."""
        start = req._position
        return min(len(req.prompt), (start // self.prefill_chunk + 1) * self.prefill_chunk) - start

    def _prefill_group(self, group: list[Request]) -> None:
        """Prefill the next chunk (all of one length) of every request in ``group`` in one forward."""
        n = self._next_chunk(group[0])
        if n > 0:
            tokens = torch.tensor([r.prompt[r._position : r._position + n] for r in group], device=self.device)
            segment_pos = torch.stack([torch.arange(r._position, r._position + n, device=self.device) for r in group])
            cache = group[0]._cache if len(group) == 1 else Cache.stack([r._cache for r in group])
            score = self._scores_prompt(group[0])
            logits, cache = self.model(tokens, segment_pos, cache=cache, last_only=not score)
            for i, req in enumerate(group):
                req._cache = cache if len(group) == 1 else cache.select(torch.tensor([i], device=self.device))
                if score:
                    self._score_prompt(req, logits[i], req._position, req._position + n)
                req._position += n
                req._last = logits[i : i + 1, -1]  # (1, V)
                if self.prefix_cache is not None and req._position % self.prefill_chunk == 0:
                    self.prefix_cache.insert(req.prompt, req._position, req._cache, req._last)
        for req in group:
            if req._position == len(req.prompt):
                self._finish_prefill(req)

    def _finish_prefill(self, req: Request) -> None:
        """The prompt is in the cache: sample the first token and join the running batch."""
        self._prefilling.remove(req)
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
        if start == 0:
            req.prompt_logprobs.append(None)
        logp = _log_softmax(logits)
        for t in range(start, min(end, len(req.prompt) - 1)):
            req.prompt_logprobs.append(self._logprob(logp[t - start], req.prompt[t + 1], req.params.logprobs))

    @staticmethod
    def _logprob(logp: torch.Tensor, token: int, k: int | None) -> TokenLogprob:
        top = {}
        if k:
            values, ids = torch.topk(logp, k)
            top = dict(zip(ids.tolist(), values.tolist(), strict=True))
        return TokenLogprob(float(logp[token]), top)

    def _sample(self, req: Request, logits: torch.Tensor) -> int:
        p = req.params
        return int(sample_next(logits, p.temperature, p.top_k, p.top_p, req._generator)[0])

    def _emit(self, req: Request, token: int, logits: torch.Tensor) -> None:
        """Append a generated token; decide whether the request is done."""
        now = time.monotonic()
        if req.first_token_time is None:
            req.first_token_time = now
            self.metrics.observe_ttft(now - req.arrival)
        if req.params.logprobs is not None:
            req.logprobs.append(self._logprob(_log_softmax(logits[0]), token, req.params.logprobs))
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
        logits = self._decode_step(tokens, self._batch)  # (B, V)
        done = []
        for i, req in enumerate(self._running):
            self._emit(req, self._sample(req, logits[i : i + 1]), logits[i : i + 1])
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
        req._cache = None
        if req.first_token_time is not None and len(req.tokens) > 1:
            self.metrics.observe_tpot((now - req.first_token_time) / (len(req.tokens) - 1))
        self.metrics.requests[reason] = self.metrics.requests.get(reason, 0) + 1
        req.finish_reason = reason
        with self._lock:
            self._by_id.pop(req.id, None)
        if req.notify is not None:
            req.notify(req)


class EngineThread:
    """Runs :meth:`Engine.step` on a background thread while there is work; sleeps otherwise. An
    exception inside a step finishes the requests in flight with reason ``error`` (their callers
    answer with an error) and the loop goes on; ``errors`` counts them, ``last_error`` keeps the last."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.errors = 0
        self.last_error: str | None = None
        self._thread = threading.Thread(target=self._loop, name="griffon-engine", daemon=True)

    def start(self) -> EngineThread:
        self._thread.start()
        return self

    def wake(self) -> None:
        """Call after submitting or cancelling: the loop may be asleep."""
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.is_set():
            if not self.engine.has_work():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                self.engine.step()
            except Exception as e:  # a bad step must not take the server down with it
                self.errors += 1
                self.last_error = f"{type(e).__name__}: {e}"
                self.engine.abort_all("error")
