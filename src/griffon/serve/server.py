"""An OpenAI-compatible HTTP server over the engine: FastAPI + uvicorn (``pip install griffon[serve]``).

    griffon serve RUN_OR_CHECKPOINT --host 127.0.0.1 --port 8000 [--api-key-file FILE]

Endpoints: ``POST /v1/completions`` (OpenAI's legacy completions: a prompt string, token ids or a
batch of either; every parameter of OpenAI's API but ``suffix``, which is refused: ``max_tokens``,
``temperature``, ``top_p``, ``seed``, ``stop``, ``n`` and ``best_of`` (choices ranked by their
mean log-probability per token), ``presence_penalty``, ``frequency_penalty``, ``logit_bias``,
``stream`` as server-sent events ending in ``data: [DONE]``, ``echo`` and ``logprobs``, which is
what lm-evaluation-harness's ``local-completions`` model scores with; and vLLM's extensions
``top_k``, ``min_p``, ``repetition_penalty``, ``min_tokens``, ``stop_token_ids`` and
``ignore_eos``), ``GET /v1/models``, ``GET /health`` and ``GET /metrics`` (Prometheus text).
``POST /v1/chat/completions`` (OpenAI's chat API, streaming included: the conversation rendered
with the model's chat template, :mod:`griffon.serve.chat`).

The front end holds its own deadline: a request the engine has not finished ``DEADLINE_GRACE``
seconds after its ``request_timeout`` is cancelled and answered 504 (a stream that has begun ends
with finish reason ``abort``), so a hung engine cannot hold a client for ever; and while requests
are pending, an engine silent for ``stall_timeout`` seconds (its loop sends a heartbeat between
steps) turns ``/health`` and new requests to 503.

Bad input gets a 4xx with one message in OpenAI's error shape (``{"error": {"message": ...}}``):
invalid JSON, unknown fields and wrong types (strict parsing: no string-to-number coercion), values
out of range, a request over a limit (400 naming the limit and the request's value; a body over
its limit 413); a full queue answers 429 with ``Retry-After``. The API key is checked before the
body is read. Until the engine has warmed up, and once shutdown has begun, ``/health`` and the
``/v1`` endpoints answer 503. A request whose client disconnects is cancelled and its slot freed.
An error inside a request fails that request alone (500) and never stops the server.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from griffon.align.chat import ChatTemplate, ChatTemplateError, template_for
from griffon.data.tokenizers import Tokenizer
from griffon.decode.output import Detokenizer
from griffon.decode.sampling import SEED_MIN, SamplingParams
from griffon.engine.client import EngineClient, InprocClient
from griffon.engine.core import Engine
from griffon.engine.limits import (
    DEFAULT_BODY_TIMEOUT,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_STALL_TIMEOUT,
)
from griffon.engine.request import QueueFull
from griffon.engine.request import Request as EngineRequest
from griffon.serve.chat import ChatStream, chat_body, completion_fields
from griffon.serve.schema import ChatCompletionRequest, CompletionRequest, CompletionResponse, ErrorResponse

log = logging.getLogger("griffon.serve")

# Seconds a client is told to wait after a 429 or a 503 while starting.
RETRY_AFTER = 1
# Seconds between checks that a client waiting for a whole (non-streamed) answer is still there.
DISCONNECT_POLL = 0.25
# Seconds past a request's ``request_timeout`` that the front end waits for the engine to end it
# (the engine aborts it at its next step) before answering 504 itself.
DEADLINE_GRACE = 5.0
# Engine finish reasons as OpenAI-style servers (vLLM) report them; "stop" and "length" stay.
_REASONS = {"cancelled": "abort", "timeout": "abort", "error": "abort", "shutdown": "abort"}


def _best_of(body: CompletionRequest) -> int:
    return body.best_of if body.best_of is not None else body.n


_ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 429, 500, 503, 504)}
# A streamed answer's events, as OpenAPI 3.2 describes server-sent events (itemSchema: one event)
_EVENT = {"type": "object", "properties": {"data": {"type": "string"}}, "required": ["data"]}
_COMPLETION = {200: {"model": CompletionResponse, "content": {"text/event-stream": {"itemSchema": _EVENT}}}}


def _error_body(status: int, message: str, kind: str) -> dict:
    return {"error": {"message": message, "type": kind, "param": None, "code": status}}


def _error(status: int, message: str, kind: str = "invalid_request_error", headers: dict | None = None):
    return JSONResponse(_error_body(status, message, kind), status_code=status, headers=headers)


_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict"}


def _describe(error: dict) -> str:
    # a location without "body" and without pydantic's union tags ("constrained-str", "list[int]")
    loc = [
        p for p in error.get("loc", ()) if isinstance(p, int) or (p.isidentifier() and p not in _UNION_TAGS | {"body"})
    ]
    where = ".".join(str(p) for p in loc)
    if error.get("type") == "json_invalid":
        return f"invalid JSON in the request body: {error.get('ctx', {}).get('error', error.get('msg'))}"
    if error.get("type") == "extra_forbidden":
        return f"unknown field '{where}'"
    return f"{where}: {error.get('msg')}" if where else str(error.get("msg"))


class BodyTooLarge(HTTPException):
    """The request body is over the server's limit (an HTTPException, so FastAPI's body parsing
    passes it on as it is)."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            413, f"the request body has more than {limit} bytes; this server's limit is max_body_bytes={limit}"
        )


class BodyTimeout(HTTPException):
    """The request body did not arrive whole in time (an HTTPException, as :class:`BodyTooLarge`)."""

    def __init__(self, seconds: float) -> None:
        super().__init__(408, f"the request body did not arrive within body_timeout={seconds:g} s")


class Gate:
    """ASGI middleware in front of the app: the API key (401) and the body's size (413) are
    checked before the body is read, so a client without the key learns nothing from its body
    and a large body is refused without being held; a body that has not arrived whole within
    ``body_timeout`` seconds of the request's start is refused (408), so a half-sent body holds
    nothing for long. Pure ASGI (no BaseHTTPMiddleware), so streamed answers pass through untouched."""

    def __init__(self, app: ASGIApp, server: Server) -> None:
        self.app = app
        self.server = server

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        server = self.server
        headers = dict(scope["headers"])
        if scope["path"].startswith("/v1") and not server.authorized(headers.get(b"authorization", b"")):
            server.rejected("unauthorized")
            body = _error_body(401, "missing or wrong API key (Authorization: Bearer KEY)", "authentication_error")
            await JSONResponse(body, status_code=401)(scope, receive, send)
            return
        limit = server.max_body_bytes
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            server.rejected("too_large")
            message = f"the request body has {length.decode(errors='replace')} bytes; this server's limit is max_body_bytes={limit}"
            await JSONResponse(_error_body(413, message, "invalid_request_error"), status_code=413)(
                scope, receive, send
            )
            return
        seen, whole = 0, False
        deadline = time.monotonic() + server.body_timeout

        async def counted() -> Message:  # a body sent without a length (chunked) is counted as it comes
            nonlocal seen, whole
            if whole:  # the body is in: what follows is a disconnect, which may come at any time
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), timeout=max(deadline - time.monotonic(), 0))
            except TimeoutError:
                server.rejected("body_timeout")
                raise BodyTimeout(server.body_timeout) from None
            seen += len(message.get("body", b""))
            whole = message["type"] != "http.request" or not message.get("more_body", False)
            if seen > limit:
                server.rejected("too_large")
                raise BodyTooLarge(limit)
            return message

        await self.app(scope, counted, send)


class TextOffsets:
    """Where each output entry's text starts in the answer (OpenAI's ``text_offset``): the length
    of the whole characters that the entries before it decode to, so every offset indexes the
    returned text, also where byte tokens split a character (such a token adds nothing until the
    character is whole: "é!" as three byte tokens has offsets 0, 0, 1). Without a tokenizer, the
    entries' strings (their ids) laid end to end."""

    def __init__(self, tokenizer: Tokenizer | None) -> None:
        self.detokenizer = Detokenizer(tokenizer) if tokenizer is not None else None
        self.end = 0

    def next(self, token: int, piece: str) -> int:
        """The offset of an entry (token id ``token``, shown as ``piece``); the entry is taken in."""
        if self.detokenizer is None:
            offset, self.end = self.end, self.end + len(piece)
            return offset
        offset = len(self.detokenizer.complete)
        self.detokenizer.push(token)
        return offset


class Server:
    """The app's state: the engine's client (:class:`~griffon.engine.client.EngineClient`: the
    engine on a thread of this process or in its own), readiness, and how requests become engine
    requests."""

    def __init__(
        self, client: EngineClient, model_name: str, api_key: str | None, max_body_bytes: int,
        stall_timeout: float = DEFAULT_STALL_TIMEOUT, body_timeout: float = DEFAULT_BODY_TIMEOUT,
    ) -> None:  # fmt: skip
        self.client = client
        self.stall_timeout = stall_timeout
        self.body_timeout = body_timeout
        self.model_name = model_name
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.created = int(time.time())
        self.ready = threading.Event()
        self.draining = False
        self.rejections: dict[str, int] = {}
        self._pending: set[asyncio.Queue] = set()
        self._pending_lock = threading.Lock()
        self._dispatch_scheduled = False

    def start(self) -> None:
        """Start the engine and declare the server ready once its warm-up is over (the HTTP server
        answers 503 meanwhile)."""
        self.client.start()

        def run() -> None:
            self.client.wait_ready()
            self.ready.set()

        threading.Thread(target=run, name="griffon-ready", daemon=True).start()

    def stop(self) -> None:
        self.ready.wait()
        self.client.stop()

    def drain(self, seconds: float) -> None:
        """Shutdown has begun: refuse new requests (503) and let those running finish within ``seconds``."""
        self.draining = True
        self.client.drain(seconds)

    def stalled(self) -> float | None:
        """Seconds the engine has been silent while requests are pending, if more than ``stall_timeout``."""
        if not self.ready.is_set() or not self.client.pending():
            return None
        silent = time.monotonic() - self.client.last_beat
        return silent if silent > self.stall_timeout else None

    def deadline(self, requests: list[EngineRequest]) -> float | None:
        """When the front end stops waiting for ``requests`` (monotonic seconds; None: never)."""
        timeout = self.client.limits.request_timeout
        if timeout is None:
            return None
        return min(r.arrival for r in requests) + timeout + DEADLINE_GRACE

    def timed_out(self) -> JSONResponse:
        self.rejected("timeout")
        timeout = self.client.limits.request_timeout
        return _error(504, f"the engine did not finish this request within request_timeout={timeout:g} s",
                      kind="timeout")  # fmt: skip

    def rejected(self, reason: str) -> None:
        """Count a refused HTTP request once, whatever the number of prompts in it."""
        self.rejections[reason] = self.rejections.get(reason, 0) + 1

    def wake_later(self, loop: asyncio.AbstractEventLoop, wake: asyncio.Queue) -> None:
        """Wake a response's queue from the engine's thread. Wake-ups are gathered and handed to
        the event loop in one call, so a decode step of B requests costs one cross-thread call,
        not B (each writes to the loop's self-pipe)."""
        with self._pending_lock:
            self._pending.add(wake)
            if self._dispatch_scheduled:
                return
            self._dispatch_scheduled = True
        loop.call_soon_threadsafe(self._dispatch)

    def _dispatch(self) -> None:
        with self._pending_lock:
            pending, self._pending = self._pending, set()
            self._dispatch_scheduled = False
        for wake in pending:
            wake.put_nowait(None)

    def authorized(self, header: bytes) -> bool:
        if self.api_key is None:
            return True
        given = header[7:] if header[:7].lower() == b"bearer " else b""
        return hmac.compare_digest(given, self.api_key.encode())  # constant time

    def prompts(self, body: CompletionRequest) -> list[list[int]]:
        """The prompts' token ids; a batch whose choices (prompts x ``best_of``) could never all
        wait in the queue is refused."""
        p = body.prompt
        if not p:
            raise ValueError("prompt is empty")
        texts = isinstance(p, str) or isinstance(p[0], str)
        batch = [p] if isinstance(p, str) or isinstance(p[0], int) else p
        choices = _best_of(body)
        if len(batch) * choices > self.client.max_queue:  # before any of it is tokenised
            raise ValueError(
                f"the prompt is a batch of {len(batch)} x {choices} choices; this server queues at most "
                f"max_queue={self.client.max_queue} of them, so the batch can never fit: send it in parts"
            )
        if not texts:
            return batch  # type: ignore[return-value]
        if self.client.tokenizer is None:
            raise ValueError("this server has no tokenizer: send prompts as token ids")
        return [self.client.tokenizer.encode(t) for t in batch]  # type: ignore[arg-type]

    def params(self, body: CompletionRequest) -> list[SamplingParams]:
        """Each choice's sampling parameters (``best_of`` of them per prompt): the same but for the
        seed, which with ``seed`` set is ``seed + i`` for choice i (wrapping around int64)."""
        if body.suffix is not None:
            raise ValueError("suffix is not supported: griffon's models are not trained to fill in the middle")
        best_of = _best_of(body)
        if best_of < body.n:
            raise ValueError(f"best_of ({best_of}) must be at least n ({body.n})")
        if body.stream and best_of > body.n:
            raise ValueError("best_of > n cannot be streamed: the best choices are known only at the end")
        bias = []
        for key, value in (body.logit_bias or {}).items():
            if not key.isdigit():
                raise ValueError(f"logit_bias keys are token ids, got {key!r}")
            bias.append((int(key), value))
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        params = SamplingParams(
            max_tokens=body.max_tokens, temperature=body.temperature, top_k=body.top_k if body.top_k > 0 else None,
            top_p=body.top_p if body.top_p < 1 else None, seed=body.seed, stop=stop, ignore_eos=body.ignore_eos,
            logprobs=body.logprobs, echo=body.echo, presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty, repetition_penalty=body.repetition_penalty,
            logit_bias=tuple(bias), min_p=body.min_p, min_tokens=body.min_tokens,
            stop_token_ids=tuple(body.stop_token_ids or ()), score=best_of > body.n,
        )  # fmt: skip
        if body.seed is None:
            return [params] * best_of
        return [dataclasses.replace(params, seed=(body.seed + i - SEED_MIN) % 2**64 + SEED_MIN) for i in range(best_of)]

    def submit(
        self, prompts: list[list[int]], choices: list[SamplingParams], wake: asyncio.Queue
    ) -> list[EngineRequest]:
        """Submit every choice of every prompt, prompt by prompt (all or none: a full queue
        cancels those already in). The server's limits count every choice."""
        for prompt in prompts:
            self.client.check(prompt, choices[0], choices=len(choices))
        loop = asyncio.get_running_loop()

        def notify(req: EngineRequest) -> None:  # on the engine's thread
            self.wake_later(loop, wake)

        requests: list[EngineRequest] = []
        try:
            for prompt in prompts:
                for params in choices:
                    requests.append(self.client.submit(prompt, params, notify=notify, checked=True))
        except QueueFull:
            for r in requests:
                self.client.cancel(r.id)
            raise
        finally:
            self.client.wake()
        return requests

    def cancel(self, requests: list[EngineRequest]) -> None:
        for r in requests:
            if not r.finished:
                self.client.cancel(r.id)
        self.client.wake()

    # ----- response bodies ------------------------------------------------------------------------

    def text(self, req: EngineRequest, final: bool) -> str:
        return "" if req.text is None else req.text.visible(final=final or req.finished)

    def token_str(self, token: int) -> str:
        return self.client.tokenizer.decode([token]) if self.client.tokenizer is not None else str(token)

    @staticmethod
    def ready_entries(req: EngineRequest) -> int:
        """Output entries (with echo the prompt's tokens, then the generated ones) whose text and
        log-probabilities can be sent: with echo and logprobs, none until the prompt is scored."""
        if req.params.echo and req.params.logprobs is not None and not req.prompt_done:
            return 0
        return (len(req.prompt) if req.params.echo else 0) + len(req.tokens)

    def logprobs(self, req: EngineRequest, start: int, end: int, where: TextOffsets) -> dict:
        """OpenAI's ``logprobs`` object for output entries [start, end); ``where`` has been given
        the entries before ``start`` and places these in the answer's text."""
        echoed = len(req.prompt) if req.params.echo else 0
        ids = req.prompt[start : min(end, echoed)] + req.tokens[max(start - echoed, 0) : max(end - echoed, 0)]
        tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
        for token, entry in zip(ids, req.logprob_entries(start, end), strict=True):
            piece = self.token_str(token)
            tokens.append(piece)
            offsets.append(where.next(token, piece))
            token_logprobs.append(None if entry is None else entry.logprob)
            if entry is None:
                top_logprobs.append(None)
                continue
            top: dict[str, float] = {}
            for t, lp in [*entry.top.items(), (token, entry.logprob)]:  # the token taken too, as OpenAI
                s = self.token_str(t)
                top[s] = max(lp, top.get(s, float("-inf")))
            top_logprobs.append(top)
        body = {
            "tokens": tokens,
            "token_logprobs": token_logprobs,
            "top_logprobs": top_logprobs,
            "text_offset": offsets,
        }
        return body

    def echo_text(self, req: EngineRequest) -> str:
        """The prompt's text, which an ``echo`` answer starts with ("" without a tokenizer or echo)."""
        if not req.params.echo or self.client.tokenizer is None:
            return ""
        return self.client.tokenizer.decode(req.prompt)

    def choice(self, index: int, req: EngineRequest) -> dict:
        logprobs = None
        if req.params.logprobs is not None:
            logprobs = self.logprobs(req, 0, self.ready_entries(req), TextOffsets(self.client.tokenizer))
        return {
            "index": index,
            "text": self.echo_text(req) + self.text(req, final=True),
            "logprobs": logprobs,
            "finish_reason": _REASONS.get(req.finish_reason, req.finish_reason),
        }

    def usage(self, requests: list[EngineRequest], choices: int = 1) -> dict:
        """Token counts: each prompt once (``choices`` requests share it), every choice's tokens."""
        prompt = sum(len(r.prompt) for r in requests[::choices])
        completion = sum(len(r.tokens) for r in requests)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def envelope(self, rid: str, choices: list[dict]) -> dict:
        return {"id": rid, "object": "text_completion", "created": self.created, "model": self.model_name,
                "choices": choices}  # fmt: skip

    # ----- the two ways of answering -------------------------------------------------------------

    async def wait(
        self, http: Request, requests: list[EngineRequest], wake: asyncio.Queue, done: Callable[[], bool]
    ) -> JSONResponse | None:
        """Wait until ``done()``, checking every :data:`DISCONNECT_POLL` seconds that the client is
        still there (also while tokens keep coming) and holding the front end's deadline; None once
        done, else the answer to give (the requests cancelled): 499 for a client gone, 504 past
        the deadline."""
        deadline = self.deadline(requests)
        next_check = time.monotonic() + DISCONNECT_POLL
        while not done():
            until = next_check if deadline is None else min(next_check, deadline)
            try:
                await asyncio.wait_for(wake.get(), timeout=max(until - time.monotonic(), 0))
            except TimeoutError:
                pass
            now = time.monotonic()
            if deadline is not None and now >= deadline and not done():
                self.cancel(requests)
                return self.timed_out()
            if now >= next_check:
                if await http.is_disconnected():
                    self.cancel(requests)
                    return _error(499, "client disconnected")
                next_check = now + DISCONNECT_POLL
        return None

    async def complete(
        self, http: Request, requests: list[EngineRequest], wake: asyncio.Queue, rid: str, n: int = 1,
        best_of: int = 1, shape: Callable[[dict], dict] | None = None,
    ):  # fmt: skip
        """Wait for every request, checking every :data:`DISCONNECT_POLL` seconds that the client
        is still there (also while tokens keep coming), and answer with the whole completion: of
        each prompt's ``best_of`` choices, the ``n`` with the highest mean log-probability per token
        (OpenAI's "best"), best first. ``shape`` turns the completions body into another API's
        (the chat API's)."""
        refusal = await self.wait(http, requests, wake, lambda: all(r.finished for r in requests))
        if refusal is not None:
            return refusal
        failed = [r for r in requests if r.finish_reason == "error"]
        if failed:
            return _error(500, f"the engine failed on this request: {failed[0].error}", kind="internal_error")
        chosen = []
        for start in range(0, len(requests), best_of):
            group = requests[start : start + best_of]
            if best_of > n:
                group = sorted(group, key=lambda r: r.cumulative_logprob / max(len(r.tokens), 1), reverse=True)[:n]
            chosen += group
        body = self.envelope(rid, [self.choice(i, r) for i, r in enumerate(chosen)])
        body |= {"usage": self.usage(requests, best_of)}
        return JSONResponse(shape(body) if shape is not None else body)

    async def stream(
        self, requests: list[EngineRequest], wake: asyncio.Queue, rid: str, usage: bool, choices: int = 1,
        shape: Callable[[dict], list[dict]] | None = None,
    ) -> AsyncIterator[bytes]:  # fmt: skip
        """One event per new token of each request, the echoed prompt first (once it is scored,
        with logprobs); ``text_offset`` counts from the start of the answer, echo included, so the
        events concatenated are the non-streamed answer. ``shape`` turns each completions event
        into another API's events (the chat API's). The events ready at a wake-up go out in one
        write (a decode step's tokens of every choice), serialised with orjson."""
        async for events in self._stream(requests, wake, rid, usage, choices):
            chunk = []
            for event in events:
                if event is None:
                    chunk.append(b"data: [DONE]\n\n")
                    continue
                for shaped in [event] if shape is None else shape(event):
                    chunk.append(b"data: " + orjson.dumps(shaped) + b"\n\n")
            yield b"".join(chunk)

    async def _stream(
        self, requests: list[EngineRequest], wake: asyncio.Queue, rid: str, usage: bool, choices: int
    ) -> AsyncIterator[list[dict | None]]:
        """:meth:`stream`'s events as completions bodies, then None for ``[DONE]``: a list of
        those ready at each wake-up."""
        k = len(requests)
        sent_text, sent_entries = [0] * k, [0] * k
        where = [TextOffsets(self.client.tokenizer) for _ in range(k)]
        echoed, closed = [not r.params.echo for r in requests], [False] * k
        deadline = self.deadline(requests)
        try:
            while not all(closed):
                ready_events: list[dict | None] = []
                for i, r in enumerate(requests):
                    if closed[i]:
                        continue
                    finished = r.finished  # read first: what is read below is then at least as new
                    ready = self.ready_entries(r)
                    if not echoed[i]:  # the prompt goes first, with its scores once they are there
                        if not (ready or finished):
                            continue
                        lp = None
                        if r.params.logprobs is not None and ready:
                            lp = self.logprobs(r, 0, len(r.prompt), where[i])
                        ready_events.append(self._event(rid, i, self.echo_text(r), lp, None))
                        echoed[i], sent_entries[i] = True, len(r.prompt)
                    text = self.text(r, final=finished)
                    delta = text[sent_text[i] :]
                    if delta or ready > sent_entries[i] or finished:  # one event per new token, as vLLM
                        lp = None
                        if r.params.logprobs is not None:
                            lp = self.logprobs(r, sent_entries[i], max(ready, sent_entries[i]), where[i])
                        reason = None
                        if finished:
                            reason = _REASONS.get(r.finish_reason, r.finish_reason)
                            closed[i] = True
                        ready_events.append(self._event(rid, i, delta, lp, reason))
                        sent_text[i], sent_entries[i] = len(text), max(ready, sent_entries[i])
                if not all(closed):
                    if ready_events:
                        yield ready_events
                    try:
                        remaining = None if deadline is None else max(deadline - time.monotonic(), 0)
                        await asyncio.wait_for(wake.get(), timeout=remaining)
                    except TimeoutError:  # past the front end's deadline: the open choices end here
                        self.cancel(requests)
                        self.rejected("timeout")
                        ready_events = [self._event(rid, i, "", None, "abort") for i in range(k) if not closed[i]]
                        break
                    while not wake.empty():  # one pass serves every wake-up so far
                        wake.get_nowait()
            if usage:
                ready_events.append(self.envelope(rid, []) | {"usage": self.usage(requests, choices)})
            yield [*ready_events, None]
        finally:  # also when the client went away and the response task was cancelled
            self.cancel(requests)

    def _event(self, rid: str, index: int, text: str, logprobs: dict | None, reason: str | None) -> dict:
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}
        return self.envelope(rid, [choice])


def create_app(
    engine: Engine | EngineClient,
    model_name: str = "griffon",
    api_key: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    warm_up: bool = True,
    chat_template: ChatTemplate | None = None,
    stall_timeout: float = DEFAULT_STALL_TIMEOUT,
    body_timeout: float = DEFAULT_BODY_TIMEOUT,
) -> FastAPI:
    """The FastAPI app serving ``engine``: an :class:`~griffon.engine.client.EngineClient` (such as
    an :class:`~griffon.engine.process.EngineProcess`, whose own ``warm_up`` applies), or an
    :class:`~griffon.engine.core.Engine`, run on a thread of this process
    (:class:`~griffon.engine.client.InprocClient`, warmed up first with ``warm_up``). The engine is
    started here (one that cannot start raises); the app answers 503 until its warm-up is over, and
    its lifespan stops it. With an API key, the interactive docs and the OpenAPI schema are off;
    ``/health`` and ``/metrics`` stay open, as vLLM's do. Chat requests are rendered with
    ``chat_template`` (default: the tokenizer's, :func:`griffon.align.chat.template_for`; an engine
    without a tokenizer serves no chat)."""
    client = engine if isinstance(engine, EngineClient) else InprocClient(engine, warm_up)
    client.start()
    server = Server(client, model_name, api_key, max_body_bytes, stall_timeout, body_timeout)
    if chat_template is None and client.tokenizer is not None:
        chat_template = template_for(client.tokenizer)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        server.start()
        yield
        server.stop()

    docs = {} if api_key is None else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="griffon", lifespan=lifespan, **docs)
    app.state.server = server
    app.add_middleware(Gate, server=server)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        server.rejected("invalid")
        # A prompt that fits none of the union's forms fails each; the most telling error is a
        # broken constraint (an empty list) rather than a wrong type (not a string), the deepest first.
        errors = sorted(exc.errors(), key=lambda e: (str(e.get("type", "")).endswith("_type"), -len(e.get("loc", ()))))
        return _error(400, _describe(errors[0]) if errors else "invalid request")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):
        log.error("internal error answering %s", request.url.path, exc_info=exc)
        return _error(500, f"internal error: {type(exc).__name__}", kind="internal_error")

    def unavailable() -> JSONResponse | None:
        if server.client.dead is not None:
            return _error(503, f"the engine process is gone ({server.client.dead})", kind="unavailable")
        silent = server.stalled()
        if silent is not None:
            return _error(503, f"the engine has not answered for {silent:.0f} s", kind="unavailable")
        if server.draining:
            return _error(503, "the server is shutting down", kind="unavailable")
        if not server.ready.is_set():
            return _error(503, "the server is starting", kind="unavailable", headers={"Retry-After": str(RETRY_AFTER)})
        return None

    @app.get("/health", responses={503: {"description": "starting or shutting down"}})
    async def health():
        if server.client.dead is not None:
            return JSONResponse({"status": f"the engine process is gone ({server.client.dead})"}, status_code=503)
        silent = server.stalled()
        if silent is not None:
            status = f"the engine has not answered for {silent:.0f} s with requests pending"
            return JSONResponse({"status": status}, status_code=503)
        if server.draining:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        if not server.ready.is_set():
            return JSONResponse({"status": "starting"}, status_code=503, headers={"Retry-After": str(RETRY_AFTER)})
        return {"status": "ok", "engine_errors": server.client.errors}

    @app.get("/v1/models", responses=_ERRORS)
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": server.created,
                                            "owned_by": "griffon"}]}  # fmt: skip

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        text = client.metrics.render(*client.prefix_stats(), server.rejections)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    async def answer(body: CompletionRequest, http: Request, top_logprobs: int | None = None):
        """Answer a completions request; with ``top_logprobs`` (a chat request's), in the chat API's shape."""
        refusal = unavailable()
        if refusal is not None:
            server.rejected("unavailable")
            return refusal
        if body.model is not None and body.model != model_name:
            server.rejected("invalid")
            return _error(404, f"model '{body.model}' does not exist; this server serves '{model_name}'")
        wake: asyncio.Queue = asyncio.Queue()
        try:
            choices = server.params(body)
            # Tokenising megabytes of text takes a while: off the event loop, which serves the rest.
            prompts = await asyncio.to_thread(server.prompts, body)
            requests = server.submit(prompts, choices, wake)
        except QueueFull:
            server.rejected("queue_full")
            return _error(429, "the server's queue is full; retry later", headers={"Retry-After": str(RETRY_AFTER)})
        except ValueError as e:
            server.rejected("invalid")
            return _error(400, str(e))
        rid = f"cmpl-{uuid.uuid4().hex}"
        chat = top_logprobs is not None
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            shape_events = ChatStream(top_logprobs) if chat else None
            # The status is sent with the first event: until the engine has something to send, a
            # request can still be answered 504 (a hung engine) instead of an empty 200 stream.
            started = lambda: any(r.finished or server.ready_entries(r) for r in requests)
            refusal = await server.wait(http, requests, wake, started)
            if refusal is not None:
                return refusal
            stream = server.stream(requests, wake, rid, usage, len(choices), shape=shape_events)
            return StreamingResponse(stream, media_type="text/event-stream")
        shape = (lambda b: chat_body(b, top_logprobs)) if chat else None
        return await server.complete(http, requests, wake, rid, body.n, len(choices), shape=shape)

    @app.post("/v1/completions", responses=_COMPLETION | _ERRORS)
    async def completions(body: CompletionRequest, http: Request):
        return await answer(body, http)

    @app.post("/v1/chat/completions", responses=_ERRORS)
    async def chat_completions(body: ChatCompletionRequest, http: Request):
        if chat_template is None:
            server.rejected("invalid")
            return _error(400, "this server has no tokenizer, so no chat template: use /v1/completions")
        try:
            fields = await asyncio.to_thread(completion_fields, body, chat_template)  # rendering: off the loop
            request = CompletionRequest.model_validate(fields, strict=False)
        except (ValueError, ChatTemplateError) as e:
            server.rejected("invalid")
            return _error(400, str(e).splitlines()[0])
        return await answer(request, http, top_logprobs=body.top_logprobs or 0)

    return app


def run(
    app: FastAPI, host: str, port: int, shutdown_timeout: float, max_connections: int = DEFAULT_MAX_CONNECTIONS
) -> None:
    """Serve ``app`` until SIGTERM or SIGINT, then shut down within about ``shutdown_timeout``
    seconds: stop accepting, answer new requests on open connections with 503, let running requests
    finish until then and abort the rest (each stream gets a final event and ``[DONE]``), exit. A
    second SIGINT exits at once. Beyond ``max_connections`` open connections and running requests,
    new ones are answered 503 (uvicorn's ``limit_concurrency``)."""
    import uvicorn

    server: Server = app.state.server

    class Graceful(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            if not server.draining:
                server.drain(shutdown_timeout)
            super().handle_exit(sig, frame)

    # uvicorn's own bound is a backstop: the drain above ends the requests first.
    config = uvicorn.Config(
        app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=shutdown_timeout + 5,
        limit_concurrency=max_connections,
    )  # fmt: skip
    Graceful(config).run()


class BackgroundServer:
    """Run an app with uvicorn on a background thread (loopback benchmarks and tests); entering
    waits until the app is ready (warmed up)."""

    def __init__(
        self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, max_connections: int = DEFAULT_MAX_CONNECTIONS
    ) -> None:
        import uvicorn

        self.app = app
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", limit_concurrency=max_connections)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        self.app.state.server.ready.wait()
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join()
