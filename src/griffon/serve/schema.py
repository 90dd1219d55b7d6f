"""The bodies of the OpenAI-compatible API: what ``POST /v1/completions`` and
``POST /v1/chat/completions`` take and answer, and the error shape.

Requests are parsed strictly (unknown fields refused, no string-to-number coercion). The ranges
of the sampling settings are :class:`~griffon.decode.sampling.SamplingParams`'s, derived here
(:func:`setting`), so the API refuses exactly what the engine would; what a schema cannot say
(token ids inside the vocabulary, the server's limits, ``max_tokens=0`` only with ``echo``) is
checked once a request is parsed, with a 400 as clear.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from griffon.decode.sampling import SamplingParams
from griffon.engine.limits import MAX_CHOICES, MAX_MESSAGES, MAX_PROMPTS, MAX_STOPS, PROMPT_CAP


def setting(name: str) -> Any:
    """The range of the sampling setting ``name`` (:meth:`SamplingParams.bounds`) as a field's."""
    return Field(**SamplingParams.bounds(name).schema())


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool = False


Text = Annotated[str, Field(min_length=1)]
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1, max_length=PROMPT_CAP)]
Stops = str | Annotated[list[str], Field(max_length=MAX_STOPS)]
StopIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=MAX_STOPS)]
TopK = Annotated[int, setting("top_k")] | Literal[-1, 0]
"""vLLM's encoding: -1 (or 0) keeps every token."""


class CompletionRequest(BaseModel):
    """The body of ``POST /v1/completions``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    prompt: (
        Text
        | Annotated[list[Text], Field(min_length=1, max_length=MAX_PROMPTS)]
        | TokenIds
        | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)]
    )
    max_tokens: Annotated[int, setting("max_tokens")] = 16
    temperature: Annotated[float, setting("temperature")] = 1.0  # below 1e-5: greedy, as vLLM
    top_p: Annotated[float, setting("top_p")] = 1.0
    top_k: TopK = -1  # vLLM's extension
    seed: Annotated[int, setting("seed")] | None = None
    stop: Stops | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None  # include_usage: a last event with the token counts
    echo: bool = False
    logprobs: Annotated[int, setting("logprobs")] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_CHOICES)] = 1
    best_of: Annotated[int, Field(ge=1, le=MAX_CHOICES)] | None = None  # default: n
    ignore_eos: bool = False
    presence_penalty: Annotated[float, setting("presence_penalty")] = 0.0
    frequency_penalty: Annotated[float, setting("frequency_penalty")] = 0.0
    logit_bias: dict[str, Annotated[float, setting("logit_bias")]] | None = None  # token id (as a string) -> bias
    suffix: str | None = None  # refused: the models are not trained to fill in the middle
    user: str | None = None
    # vLLM's extensions
    min_p: Annotated[float, setting("min_p")] = 0.0
    repetition_penalty: Annotated[float, setting("repetition_penalty")] = 1.0
    min_tokens: Annotated[int, setting("min_tokens")] = 0
    stop_token_ids: StopIds | None = None


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    """Every error answer: OpenAI's shape."""

    error: ErrorDetail


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: Literal["stop", "length", "abort"] | None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionResponse(BaseModel):
    """A whole answer; a streamed one is a series of these (without ``usage``, but for a last
    event with ``include_usage``) as server-sent events, ended by ``data: [DONE]``."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = None


class ChatStreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """The body of ``POST /v1/chat/completions``; unknown fields are refused, as for completions."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_tokens: Annotated[int, setting("max_tokens")] | None = None
    max_completion_tokens: Annotated[int, setting("max_tokens")] | None = None  # OpenAI's newer name for max_tokens
    temperature: Annotated[float, setting("temperature")] = 1.0
    top_p: Annotated[float, setting("top_p")] = 1.0
    n: Annotated[int, Field(ge=1, le=MAX_CHOICES)] = 1
    stream: bool = False
    stream_options: ChatStreamOptions | None = None
    stop: str | Annotated[list[str], Field(max_length=MAX_STOPS - 1)] | None = None  # and the end of turn
    seed: Annotated[int, setting("seed")] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, setting("logprobs")] | None = None
    presence_penalty: Annotated[float, setting("presence_penalty")] = 0.0
    frequency_penalty: Annotated[float, setting("frequency_penalty")] = 0.0
    logit_bias: dict[str, Annotated[float, setting("logit_bias")]] | None = None
    user: str | None = None
    # vLLM's extensions
    top_k: TopK = -1
    min_p: Annotated[float, setting("min_p")] = 0.0
    repetition_penalty: Annotated[float, setting("repetition_penalty")] = 1.0
    min_tokens: Annotated[int, setting("min_tokens")] = 0
    stop_token_ids: Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=MAX_STOPS)] | None = None
    ignore_eos: bool = False
