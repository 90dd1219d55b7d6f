"""A request to the serving engine and its output as it grows: generated tokens, their text and
log-probabilities (kept in arrays), and how far its prompt is prefilled (which the scheduler
plans from). What the engine keeps to compute it (its cache, its random stream) is the engine's
own (:mod:`griffon.engine.core`)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from griffon.decode.output import TextStream
from griffon.decode.sampling import SamplingParams


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
        chosen = logp.gather(-1, tokens[:, None])[:, 0].double().cpu().numpy()
        values, ids = torch.topk(logp, self.k, dim=-1)  # (n, k); k = 0 gives empty rows
        self.extend_arrays(chosen, ids.cpu().numpy(), values.double().cpu().numpy())

    def arrays(self, start: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows ``start`` onwards as arrays (the tokens' own (n,), the top ids (n, k), their values
        (n, k)): what an engine in another process sends (:mod:`griffon.engine.process`)."""
        rows = slice(start, self._n)
        return self._chosen[rows].copy(), self._ids[rows].copy(), self._values[rows].copy()

    def extend_arrays(self, chosen: np.ndarray, ids: np.ndarray, values: np.ndarray) -> None:
        """Append rows given as :meth:`arrays` gives them."""
        n = len(chosen)
        if self._n + n > len(self._chosen):
            size = max(2 * len(self._chosen), self._n + n, 16)
            self._chosen = np.resize(self._chosen, size)
            self._ids = np.resize(self._ids, (size, self.k))
            self._values = np.resize(self._values, (size, self.k))
        rows = slice(self._n, self._n + n)
        self._chosen[rows], self._ids[rows], self._values[rows] = chosen, ids, values
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
    cumulative_logprob: float = 0.0  # of the generated tokens, kept with logprobs or params.score
    prefilled: int = 0  # prompt tokens in the request's state so far (prefilled or restored)
    cancelled: bool = False  # asked to stop: the engine ends it at its next step

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def scores_prompt(self) -> bool:
        """Whether the prompt's tokens are scored (``echo`` with ``logprobs``): its prefill then
        needs every position's logits, not the last one's only."""
        return self.params.echo and self.params.logprobs is not None

    def reason_to_stop(self, now: float) -> str | None:
        """``cancelled`` or ``timeout`` if the request must stop now, else None."""
        if self.cancelled:
            return "cancelled"
        if self.deadline is not None and now > self.deadline:
            return "timeout"
        return None

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
