"""A generated sequence's output as its tokens arrive: its text (detokenised incrementally, cut
at the first stop string) and when it stops. The one set of rules that :func:`griffon.generate`
and the serving engine (:mod:`griffon.engine.output`) share."""

from __future__ import annotations

from collections.abc import Sequence

from griffon.data.tokenizers import Tokenizer
from griffon.decode.sampling import SamplingParams


def append_token(
    params: SamplingParams, tokens: list[int], text: TextStream | None, token: int, eos_id: int | None
) -> str | None:
    """Add a generated ``token`` to a sequence's ``tokens`` and, if kept, its ``text`` (the EOS
    token has none); the reason the sequence stops with it, else None: ``stop`` at ``eos_id``
    (unless ``ignore_eos``), a stop token or the first stop string, ``length`` at ``max_tokens``.
    Before ``min_tokens`` tokens nothing but ``max_tokens`` stops it, as in vLLM."""
    tokens.append(token)
    n = len(tokens)
    if text is not None and token != eos_id:
        text.push(token, stops=n >= params.min_tokens)
    if n < params.min_tokens:
        return "length" if n >= params.max_tokens else None
    is_eos = eos_id is not None and token == eos_id and not params.ignore_eos
    if is_eos or token in params.stop_token_ids or (text is not None and text.done):
        return "stop"
    return "length" if n >= params.max_tokens else None


def find_stop(text: str, stop_strings: Sequence[str], new_from: int = 0) -> int | None:
    """Where the earliest of ``stop_strings`` begins in ``text`` (None if none occurs), counting
    only occurrences that end at or after character ``new_from``."""
    hits = [i for i in (text.find(s, max(new_from - len(s) + 1, 0)) for s in stop_strings if s) if i >= 0]
    return min(hits) if hits else None


class Detokenizer:
    """Token ids in, their text out, incrementally, as in TGI and vLLM: each token decodes a short
    window (the ids since the last piece of text was taken, and the few before them that give the
    tokenizer its context: a word-boundary marker, a merge), not the whole sequence, so a token
    costs the same however long the text. ``complete`` is the text of whole characters so far;
    ids that end in an incomplete UTF-8 character wait in the window for the rest."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.complete = ""
        # ids[_prefix:_read] decode to the end of ``complete``: the context of the next window
        self._prefix = self._read = 0

    def push(self, token: int) -> str:
        """Add a token; return all the text so far: ``complete`` and the window's new text, which
        is taken into ``complete`` unless it ends in an incomplete character."""
        self.ids.append(token)
        context = self.tokenizer.decode(self.ids[self._prefix : self._read])
        window = self.tokenizer.decode(self.ids[self._prefix :])
        tail = window[len(context) :] if len(window) > len(context) else ""
        if tail and not tail.endswith("\ufffd"):
            self.complete += tail
            self._prefix, self._read, tail = self._read, len(self.ids), ""
        return self.complete + tail


class TextStream:
    """Token ids in, text out, for one row: the text that can be shown as tokens arrive, cut
    before the first stop string. Text that could still become the start of a stop string (the
    longest one's length minus one characters) or that ends in an incomplete UTF-8 character is
    held back until it cannot. ``done`` turns True at the tokenizer's EOS or a stop string.
    Detokenisation is incremental (:class:`Detokenizer`)."""

    def __init__(self, tokenizer: Tokenizer, stop_strings: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop_strings = [s for s in stop_strings if s]
        self.text = ""
        self.done = False
        self._shown = 0
        self._hold = max((len(s) for s in self.stop_strings), default=1) - 1
        self._searched = 0  # text before this is not searched for stop strings again
        self._detokenizer = Detokenizer(tokenizer)

    def push(self, token: int, stops: bool = True) -> str:
        """Add a token; return the new text that is safe to show (often empty). With ``stops``
        False (a request's first ``min_tokens``), stop strings are not looked for, and one that
        ends in the text so far never stops the stream later."""
        if self.done:
            return ""
        if token == self.tokenizer.eos_id:
            self.done = True
            return self.flush()
        # Assigned once, already cut: a reader on another thread never sees a stop string's start.
        text = self._detokenizer.push(token)
        if not stops:
            self.text, self._searched = text, len(text)
            return ""
        cut = find_stop(text, self.stop_strings, self._searched)
        if cut is not None:
            self.text, self.done = text[:cut], True
            return self.flush()
        self.text = text
        if self.text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            return ""
        return self._take(len(self.text) - self._hold)

    def visible(self, final: bool = False) -> str:
        """All the text that is safe to show so far (everything, cut at a stop string, if ``final``):
        what :meth:`push` has returned and would return, for a reader that polls instead."""
        if final or self.done:
            return self.text
        if self.text.endswith("\ufffd"):
            return self.text[: self._shown]
        return self.text[: max(self._shown, len(self.text) - self._hold)]

    def flush(self) -> str:
        """Everything not shown yet (when generation ends)."""
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        if end <= self._shown:
            return ""
        piece, self._shown = self.text[self._shown : end], end
        return piece
