"""An OpenAI-compatible HTTP server over the engine: FastAPI + uvicorn (``pip install griffon[serve]``).

    griffon serve RUN_OR_CHECKPOINT --host 127.0.0.1 --port 8000 [--api-key KEY]

Endpoints: ``POST /v1/completions`` (OpenAI's legacy completions: a prompt string, token ids or a
batch of either; ``max_tokens``, ``temperature``, ``top_p``, ``top_k``, ``seed``, ``stop``,
``stream`` as server-sent events ending in ``data: [DONE]``, ``echo`` and ``logprobs``, which is
what lm-evaluation-harness's ``local-completions`` model scores with), ``GET /v1/models``,
``GET /health`` and ``GET /metrics`` (Prometheus text).

Bad input gets a 4xx with one message in OpenAI's error shape (``{"error": {"message": ...}}``):
invalid JSON, unknown fields and wrong types (strict parsing: no string-to-number coercion), values
out of range, prompts over the model's limit; a full queue answers 429 with ``Retry-After``. A
request whose client disconnects is cancelled and its slot freed. Errors inside a request are
answered with a 500 and never stop the server.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from griffon.serve.engine import Engine, EngineThread, QueueFull, SamplingParams
from griffon.serve.engine import Request as EngineRequest

# Seconds a client is told to wait after a 429.
RETRY_AFTER = 1
# Engine finish reasons as OpenAI-style servers (vLLM) report them; "stop" and "length" stay.
_REASONS = {"cancelled": "abort", "timeout": "abort", "error": "abort"}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool = False


class CompletionRequest(BaseModel):
    """The body of ``POST /v1/completions``; unknown fields are refused."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: Annotated[int, Field(ge=0)] = 16
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    top_k: int = -1  # vLLM's extension; -1 (or 0) keeps every token
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None  # include_usage: a last event with the token counts
    echo: bool = False
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    n: Literal[1] = 1
    ignore_eos: bool = False
    presence_penalty: Literal[0, 0.0] = 0.0
    frequency_penalty: Literal[0, 0.0] = 0.0
    user: str | None = None


def _error(status: int, message: str, kind: str = "invalid_request_error", headers: dict | None = None):
    body = {"error": {"message": message, "type": kind, "param": None, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


def _describe(error: dict) -> str:
    where = ".".join(str(p) for p in error.get("loc", ()) if p != "body")
    if error.get("type") == "json_invalid":
        return f"invalid JSON in the request body: {error.get('ctx', {}).get('error', error.get('msg'))}"
    if error.get("type") == "extra_forbidden":
        return f"unknown field '{where}'"
    return f"{where}: {error.get('msg')}" if where else str(error.get("msg"))


class Server:
    """The app's state: the engine, its thread, and how requests are turned into engine requests."""

    def __init__(self, engine: Engine, model_name: str, api_key: str | None, request_timeout: float | None) -> None:
        self.engine = engine
        self.model_name = model_name
        self.api_key = api_key
        self.request_timeout = request_timeout
        self.thread = EngineThread(engine)
        self.created = int(time.time())
        self._pending: set[asyncio.Queue] = set()
        self._pending_lock = threading.Lock()
        self._dispatch_scheduled = False

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

    def authorized(self, request: Request) -> bool:
        if self.api_key is None:
            return True
        header = request.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else ""
        return hmac.compare_digest(given.encode(), self.api_key.encode())  # constant time

    def prompts(self, body: CompletionRequest) -> list[list[int]]:
        p = body.prompt
        if isinstance(p, str) or (isinstance(p, list) and p and isinstance(p[0], str)):
            if self.engine.tokenizer is None:
                raise ValueError("this server has no tokenizer: send prompts as token ids")
            texts = [p] if isinstance(p, str) else p
            return [self.engine.tokenizer.encode(t) for t in texts]
        if not p:
            raise ValueError("prompt is empty")
        return [p] if isinstance(p[0], int) else p  # type: ignore[list-item]

    def params(self, body: CompletionRequest) -> SamplingParams:
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        return SamplingParams(
            max_tokens=body.max_tokens, temperature=body.temperature, top_k=body.top_k if body.top_k > 0 else None,
            top_p=body.top_p if body.top_p < 1 else None, seed=body.seed, stop=stop, ignore_eos=body.ignore_eos,
            logprobs=body.logprobs, echo=body.echo,
        )  # fmt: skip

    def submit(self, prompts: list[list[int]], params: SamplingParams, wake: asyncio.Queue) -> list[EngineRequest]:
        """Submit every prompt (all or none: a full queue cancels those already in)."""
        for prompt in prompts:
            self.engine.check(prompt, params)
        loop = asyncio.get_running_loop()

        def notify(req: EngineRequest) -> None:  # on the engine's thread
            self.wake_later(loop, wake)

        requests: list[EngineRequest] = []
        try:
            for prompt in prompts:
                requests.append(self.engine.submit(prompt, params, timeout=self.request_timeout, notify=notify))
        except QueueFull:
            for r in requests:
                self.engine.cancel(r.id)
            raise
        finally:
            self.thread.wake()
        return requests

    def cancel(self, requests: list[EngineRequest]) -> None:
        for r in requests:
            if not r.finished:
                self.engine.cancel(r.id)
        self.thread.wake()

    # ----- response bodies ------------------------------------------------------------------------

    def text(self, req: EngineRequest, final: bool) -> str:
        return "" if req.text is None else req.text.visible(final=final or req.finished)

    def token_str(self, token: int) -> str:
        return self.engine.tokenizer.decode([token]) if self.engine.tokenizer is not None else str(token)

    def logprobs(self, req: EngineRequest, start: int, end: int, offset: int) -> dict:
        """OpenAI's ``logprobs`` object for output entries [start, end) (the prompt's first, with echo)."""
        entries = (req.prompt_logprobs if req.params.echo else []) + req.logprobs
        ids = (req.prompt if req.params.echo else []) + req.tokens
        tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
        for token, entry in zip(ids[start:end], entries[start:end], strict=True):
            piece = self.token_str(token)
            tokens.append(piece)
            offsets.append(offset)
            offset += len(piece)
            token_logprobs.append(None if entry is None else entry.logprob)
            if entry is None:
                top_logprobs.append(None)
                continue
            top: dict[str, float] = {}
            for t, lp in entry.top.items():
                s = self.token_str(t)
                top[s] = max(lp, top.get(s, float("-inf")))
            top_logprobs.append(top)
        return {
            "tokens": tokens,
            "token_logprobs": token_logprobs,
            "top_logprobs": top_logprobs,
            "text_offset": offsets,
        }

    def echo_text(self, req: EngineRequest) -> str:
        """The prompt's text, which an ``echo`` answer starts with ("" without a tokenizer or echo)."""
        if not req.params.echo or self.engine.tokenizer is None:
            return ""
        return self.engine.tokenizer.decode(req.prompt)

    def choice(self, index: int, req: EngineRequest) -> dict:
        echo = self.echo_text(req)
        logprobs = None
        if req.params.logprobs is not None:
            n = (len(req.prompt) if req.params.echo else 0) + len(req.tokens)
            logprobs = self.logprobs(req, 0, n, 0)
        reason = _REASONS.get(req.finish_reason, req.finish_reason)
        return {
            "index": index,
            "text": echo + self.text(req, final=True),
            "logprobs": logprobs,
            "finish_reason": reason,
        }

    def usage(self, requests: list[EngineRequest]) -> dict:
        prompt = sum(len(r.prompt) for r in requests)
        completion = sum(len(r.tokens) for r in requests)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def envelope(self, rid: str, choices: list[dict]) -> dict:
        return {"id": rid, "object": "text_completion", "created": self.created, "model": self.model_name,
                "choices": choices}  # fmt: skip

    # ----- the two ways of answering -------------------------------------------------------------

    async def complete(self, http: Request, requests: list[EngineRequest], wake: asyncio.Queue, rid: str):
        while not all(r.finished for r in requests):
            try:
                await asyncio.wait_for(wake.get(), timeout=0.25)
            except TimeoutError:
                if await http.is_disconnected():
                    self.cancel(requests)
                    return _error(499, "client disconnected")
        if any(r.finish_reason == "error" for r in requests):
            return _error(500, f"the engine failed on this request: {self.thread.last_error}", kind="internal_error")
        body = self.envelope(rid, [self.choice(i, r) for i, r in enumerate(requests)])
        return JSONResponse(body | {"usage": self.usage(requests)})

    async def stream(
        self, requests: list[EngineRequest], wake: asyncio.Queue, rid: str, usage: bool
    ) -> AsyncIterator[str]:
        sent_text = [0] * len(requests)
        sent_tokens = [0] * len(requests)
        closed = [False] * len(requests)
        try:
            for i, r in enumerate(requests):  # echo: the prompt goes first
                if r.params.echo:
                    n = len(r.prompt)
                    lp = self.logprobs(r, 0, n, 0) if r.params.logprobs is not None else None
                    yield self._event(rid, i, self.echo_text(r), lp, None)
                    sent_tokens[i] = n
            while not all(closed):
                for i, r in enumerate(requests):
                    if closed[i]:
                        continue
                    finished = r.finished  # read first: the text below is then at least as new
                    text = self.text(r, final=finished)
                    n = (len(r.prompt) if r.params.echo else 0) + len(r.tokens)
                    delta = text[sent_text[i] :]
                    if delta or n > sent_tokens[i] or finished:  # one event per new token, as vLLM
                        lp = None
                        if r.params.logprobs is not None:
                            lp = self.logprobs(r, sent_tokens[i], n, sent_text[i])
                        reason = None
                        if finished:
                            reason = _REASONS.get(r.finish_reason, r.finish_reason)
                            closed[i] = True
                        yield self._event(rid, i, delta, lp, reason)
                        sent_text[i], sent_tokens[i] = len(text), n
                if not all(closed):
                    await wake.get()
                    while not wake.empty():  # one pass serves every wake-up so far
                        wake.get_nowait()
            if usage:
                yield f"data: {json.dumps(self.envelope(rid, []) | {'usage': self.usage(requests)})}\n\n"
            yield "data: [DONE]\n\n"
        finally:  # also when the client went away and the response task was cancelled
            self.cancel(requests)

    def _event(self, rid: str, index: int, text: str, logprobs: dict | None, reason: str | None) -> str:
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}
        return f"data: {json.dumps(self.envelope(rid, [choice]))}\n\n"


def create_app(
    engine: Engine, model_name: str = "griffon", api_key: str | None = None, request_timeout: float | None = None
) -> FastAPI:
    """The FastAPI app serving ``engine``; its lifespan starts and stops the engine's thread."""
    server = Server(engine, model_name, api_key, request_timeout)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        server.thread.start()
        yield
        server.thread.stop()

    app = FastAPI(title="griffon", lifespan=lifespan)
    app.state.server = server

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        return _error(400, _describe(errors[0]) if errors else "invalid request")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        kind = "authentication_error" if exc.status_code == 401 else "invalid_request_error"
        return _error(exc.status_code, str(exc.detail), kind=kind)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):
        return _error(500, f"internal error: {type(exc).__name__}: {exc}", kind="internal_error")

    # A dependency rather than an HTTP middleware: Starlette's BaseHTTPMiddleware passes every
    # chunk of a streamed response through a memory stream of its own.
    async def authorize(request: Request) -> None:
        if not server.authorized(request):
            raise HTTPException(401, "missing or wrong API key (Authorization: Bearer KEY)")

    v1 = [Depends(authorize)]

    @app.get("/health")
    async def health():
        return {"status": "ok", "engine_errors": server.thread.errors, "last_error": server.thread.last_error}

    @app.get("/v1/models", dependencies=v1)
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": server.created,
                                            "owned_by": "griffon"}]}  # fmt: skip

    @app.get("/metrics")
    async def metrics():
        cache = engine.prefix_cache
        text = engine.metrics.render(cache.lookups if cache else 0, cache.hits if cache else 0)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.post("/v1/completions", dependencies=v1)
    async def completions(body: CompletionRequest, http: Request):
        if body.model is not None and body.model != model_name:
            return _error(404, f"model '{body.model}' does not exist; this server serves '{model_name}'")
        wake: asyncio.Queue = asyncio.Queue()
        try:
            params = server.params(body)
            requests = server.submit(server.prompts(body), params, wake)
        except QueueFull:
            return _error(429, "the server's queue is full; retry later", headers={"Retry-After": str(RETRY_AFTER)})
        except ValueError as e:
            return _error(400, str(e))
        rid = f"cmpl-{uuid.uuid4().hex}"
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(server.stream(requests, wake, rid, usage), media_type="text/event-stream")
        return await server.complete(http, requests, wake, rid)

    return app


class BackgroundServer:
    """Run an app with uvicorn on a background thread (loopback benchmarks and tests)."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> None:
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join()
