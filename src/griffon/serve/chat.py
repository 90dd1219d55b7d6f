"""OpenAI's chat completions over the completions path: ``POST /v1/chat/completions``.

A chat request is a completions request whose prompt is the conversation rendered with the
model's chat template (:mod:`griffon.align.chat`), opened for the assistant's turn, with the
template's end of turn as one more stop string. The answer is reshaped into the chat API's:
``message`` (or, streamed, ``delta``: the role first, then the content) for ``text``, and
log-probabilities as ``{"content": [{"token", "logprob", "bytes", "top_logprobs"}]}``.
"""

from __future__ import annotations

from griffon.align.chat import ChatTemplate
from griffon.serve.schema import ChatCompletionRequest

DEFAULT_MAX_TOKENS = 256
"""Tokens of a reply when the request names no limit (OpenAI's default is the context's room)."""


def completion_fields(body: ChatCompletionRequest, template: ChatTemplate) -> dict:
    """The completions request (its fields) that answers ``body``: the rendered conversation as
    the prompt, the end of turn added to the stops. Raises ``ValueError`` for what the schema
    cannot check (``top_logprobs`` without ``logprobs``, a template that does not render)."""
    if body.top_logprobs is not None and not body.logprobs:
        raise ValueError("top_logprobs needs logprobs: true")
    if body.max_tokens is not None and body.max_completion_tokens is not None:
        raise ValueError("give max_tokens or max_completion_tokens, not both")
    prompt = template.render([m.model_dump(exclude_none=True) for m in body.messages], add_generation_prompt=True)
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    fields = body.model_dump(exclude={"messages", "max_completion_tokens", "logprobs", "top_logprobs", "stop"})
    fields["stream_options"] = body.stream_options.model_dump() if body.stream_options else None
    return fields | {
        "prompt": prompt,
        "max_tokens": next(
            (m for m in (body.max_tokens, body.max_completion_tokens) if m is not None), DEFAULT_MAX_TOKENS
        ),  # fmt: skip
        "stop": [*stops, template.end_of_turn],
        "logprobs": (body.top_logprobs or 0) if body.logprobs else None,
    }


def _logprobs(completion: dict | None, k: int) -> dict | None:
    """Completions log-probabilities as the chat API gives them: per token its string, log-probability,
    UTF-8 bytes and its ``k`` most likely alternatives."""
    if completion is None:
        return None
    content = []
    for token, logprob, top in zip(
        completion["tokens"], completion["token_logprobs"], completion["top_logprobs"], strict=True
    ):
        best = sorted((top or {}).items(), key=lambda kv: kv[1], reverse=True)[:k]
        content.append({"token": token, "logprob": logprob, "bytes": list(token.encode()),
                        "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in best]})  # fmt: skip
    return {"content": content}


def chat_body(body: dict, top_logprobs: int) -> dict:
    """A completions answer (whole) as a ``chat.completion``."""
    choices = [
        {"index": c["index"], "message": {"role": "assistant", "content": c["text"]},
         "logprobs": _logprobs(c["logprobs"], top_logprobs), "finish_reason": c["finish_reason"]}
        for c in body["choices"]
    ]  # fmt: skip
    return body | {"id": "chat" + body["id"], "object": "chat.completion", "choices": choices}


class ChatStream:
    """Turns completions events into ``chat.completion.chunk`` events: each choice's first chunk
    carries the role, then the content as it comes, the last the reason it stopped."""

    def __init__(self, top_logprobs: int) -> None:
        self.top_logprobs = top_logprobs
        self.opened: set[int] = set()

    def __call__(self, event: dict) -> list[dict]:
        base = event | {"id": "chat" + event["id"], "object": "chat.completion.chunk"}
        if not event["choices"]:  # the usage event
            return [base]
        out = []
        for c in event["choices"]:
            if c["index"] not in self.opened:
                self.opened.add(c["index"])
                first = {"index": c["index"], "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                         "finish_reason": None}  # fmt: skip
                out.append(base | {"choices": [first]})
            delta = {"content": c["text"]} if c["text"] else {}
            chunk = {"index": c["index"], "delta": delta, "logprobs": _logprobs(c["logprobs"], self.top_logprobs),
                     "finish_reason": c["finish_reason"]}  # fmt: skip
            out.append(base | {"choices": [chunk]})
        return out
