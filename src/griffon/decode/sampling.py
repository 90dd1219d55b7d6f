"""Sampling the next token: one call for a batch whose rows each have their own temperature,
min-p, top-k, top-p and random stream, shared by :func:`griffon.generate` and the serving engine.

A row samples by the Gumbel-max trick: ``argmax(logits / T + g)`` with ``g = -log(-log u)`` for
uniform ``u``, which draws exactly from ``softmax(logits / T)`` (restricted to the tokens min-p,
top-k and top-p keep). Each row draws its noise from its own generator, so a row's tokens depend on
its seed and logits only, never on which rows share its batch.

Before that, :func:`adjust_logits` applies what depends on a row's history, in vLLM's order:
``min_tokens`` (EOS and the stop tokens barred until that many tokens are out), ``logit_bias``
(added), then the repetition penalty (over the prompt's and the output's tokens: a positive logit
divided by it, a negative one multiplied, as Keskar et al. 2019 and vLLM do) and OpenAI's
frequency and presence penalties (over the output's tokens: ``logit - f * count - p * (count > 0)``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

# Temperatures below this sample greedily, as vLLM's sampler does (its _SAMPLING_EPS): the
# distribution is then a point mass on the argmax to float32 precision anyway.
GREEDY_BELOW = 1e-5
# Seeds as vLLM accepts them: the range of a signed 64-bit integer.
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1
MAX_LOGPROBS = 20
# The largest repetition penalty accepted: far past any useful value (1.1-1.3), small enough that
# dividing a logit by it keeps the logits finite.
MAX_REPETITION_PENALTY = 100.0


@dataclass(frozen=True)
class Bounds:
    """The values a number setting takes: finite, at least ``low`` (more than it, with
    ``open_low``) and at most ``high``, where given."""

    low: int | float | None = None
    high: int | float | None = None
    open_low: bool = False

    def contains(self, x: int | float) -> bool:
        if isinstance(x, float) and not math.isfinite(x):
            return False
        if self.low is not None and (x <= self.low if self.open_low else x < self.low):
            return False
        return self.high is None or x <= self.high

    def describe(self) -> str:
        """What a value must do, for an error message: ``lie in [0, 1]``, ``be finite and >= 0``."""
        if self.high is None:
            return f"be finite and {'>' if self.open_low else '>='} {self.low}"
        if self.low is None:
            return f"be finite and <= {self.high}"
        return f"lie in {'(' if self.open_low else '['}{self.low}, {self.high}]"

    def schema(self) -> dict[str, Any]:
        """As JSON Schema's (and pydantic's ``Field``'s) keywords: ``ge`` or ``gt``, ``le``."""
        out: dict[str, Any] = {}
        if self.low is not None:
            out["gt" if self.open_low else "ge"] = self.low
        if self.high is not None:
            out["le"] = self.high
        return out


def _bounded(default: Any, low: int | float | None = None, high: int | float | None = None,
             open_low: bool = False) -> Any:  # fmt: skip
    return dataclasses.field(default=default, metadata={"bounds": Bounds(low, high, open_low)})


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples and when it stops (OpenAI's completion parameters). The ranges of
    its numbers are declared here once (:meth:`bounds`), for :meth:`validate` and for the HTTP
    schema (:mod:`griffon.serve`); a setting that is None is unset."""

    max_tokens: int = _bounded(16, low=0)
    temperature: float = _bounded(1.0, low=0)
    top_k: int | None = _bounded(None, low=1)
    top_p: float | None = _bounded(None, low=0, high=1, open_low=True)
    seed: int | None = _bounded(None, low=SEED_MIN, high=SEED_MAX)
    stop: tuple[str, ...] = ()  # stop strings: generation ends before the first (needs a tokenizer)
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = _bounded(None, low=0, high=MAX_LOGPROBS)  # of the chosen token and this many top ones
    echo: bool = False  # with logprobs: also score the prompt's tokens
    presence_penalty: float = _bounded(0.0, low=-2, high=2)  # OpenAI's: subtracted from each token in the output
    frequency_penalty: float = _bounded(0.0, low=-2, high=2)  # OpenAI's: subtracted per time a token is in it
    repetition_penalty: float = _bounded(1.0, low=0, high=MAX_REPETITION_PENALTY, open_low=True)
    """vLLM's: > 1 discourages the prompt's and output's tokens."""
    logit_bias: tuple[tuple[int, float], ...] = _bounded((), low=-100, high=100)
    """(token id, bias) pairs added to the logits; the bounds are each bias's."""
    min_p: float = _bounded(0.0, low=0, high=1)  # vLLM's: keep tokens at least this share of the likeliest's
    min_tokens: int = _bounded(0, low=0)  # vLLM's: no EOS, stop token or stop string before this many tokens
    score: bool = False  # keep the sum of the chosen tokens' log-probabilities (``best_of`` ranks by it)

    @classmethod
    def bounds(cls, name: str) -> Bounds:
        """The range of setting ``name`` (of each of its values, for ``logit_bias``)."""
        return next(f.metadata["bounds"] for f in dataclasses.fields(cls) if f.name == name)

    @property
    def adjusts_logits(self) -> bool:
        """Whether :func:`adjust_logits` changes this row's logits."""
        return bool(
            self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
            or self.logit_bias or self.min_tokens
        )  # fmt: skip

    def validate(self) -> None:
        """Raise ValueError naming the first parameter out of range (:meth:`bounds`), or out of
        step with another."""
        for f in dataclasses.fields(self):
            bounds, value = f.metadata.get("bounds"), getattr(self, f.name)
            if bounds is None or value is None:
                continue
            if f.name == "logit_bias":
                for token, bias in value:
                    if not bounds.contains(bias):
                        raise ValueError(f"logit_bias of token {token} must {bounds.describe()}, got {bias}")
            elif not bounds.contains(value):
                raise ValueError(f"{f.name} must {bounds.describe()}, got {value}")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens = 0 generates nothing; it is allowed only with echo")
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens must lie in [0, max_tokens={self.max_tokens}], got {self.min_tokens}")


def check_prompt(prompt: Sequence[int], vocab_size: int, max_len: int | None, max_tokens: int) -> None:
    """Raise ValueError if a prompt cannot be generated from: empty, ids outside the vocabulary, or
    with ``max_tokens`` more past ``max_len`` (a global-attention model's ``max_seq_len``)."""
    if len(prompt) == 0:
        raise ValueError("the prompt is empty; give at least one token")
    low, high = min(prompt), max(prompt)
    if low < 0 or high >= vocab_size:
        raise ValueError(f"prompt token ids must lie in [0, {vocab_size}), got {low if low < 0 else high}")
    if max_len is not None and len(prompt) + max_tokens > max_len:
        raise ValueError(
            f"prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) exceeds the model's limit of {max_len} tokens"
        )


def adjust_logits(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    prompts: Sequence[Sequence[int]],
    outputs: Sequence[Sequence[int]],
    eos_id: int | None = None,
) -> torch.Tensor:
    """Each row of ``logits`` (B, V) as its ``params`` change it given its prompt and output so far
    (the module docstring gives the order); ``logits`` itself when no row changes. ``eos_id`` is
    barred with the stop tokens under ``min_tokens`` (unless ``ignore_eos``). Float32 out."""
    if not any(p.adjusts_logits for p in params):
        return logits
    logits = logits.float().clone()
    V = logits.shape[-1]
    for b, p in enumerate(params):
        if not p.adjusts_logits:
            continue
        row = logits[b]  # (V,), a view: changed in place
        if len(outputs[b]) < p.min_tokens:
            barred = [*p.stop_token_ids, *([eos_id] if eos_id is not None and not p.ignore_eos else [])]
            row[torch.tensor(barred, dtype=torch.long, device=row.device)] = float("-inf")
        for token, bias in p.logit_bias:
            row[token] += bias
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted({*prompts[b], *outputs[b]}), dtype=torch.long, device=row.device)
            values = row[seen]
            row[seen] = torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
        if (p.frequency_penalty or p.presence_penalty) and len(outputs[b]):
            counts = torch.bincount(torch.tensor(outputs[b], device=row.device), minlength=V).float()  # (V,)
            row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()
    return logits


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> torch.Tensor:
    """The next token of each row of ``logits`` (B, V): row b samples with ``params[b]``'s
    temperature, min-p, top-k and top-p from ``generators[b]`` (greedy rows, temperatures below
    :data:`GREEDY_BELOW`, take the argmax and draw nothing). Returns (B,) int64."""
    B, V = logits.shape
    device = logits.device
    logits = logits.float()
    greedy = torch.tensor([p.temperature < GREEDY_BELOW for p in params], device=device)
    if bool(greedy.all()):
        return logits.argmax(-1)
    temperature = torch.tensor([max(p.temperature, GREEDY_BELOW) for p in params], device=device)
    # Shifted by the row's maximum before the division: the largest scaled logit is 0 and the rest
    # <= 0, so a small temperature underflows the others to -inf instead of overflowing to NaN.
    scaled = (logits - logits.amax(-1, keepdim=True)) / temperature[:, None]  # (B, V)
    if any(p.min_p > 0 for p in params):
        # p_i >= min_p * p_max  <=>  scaled_i >= log(min_p), the largest scaled logit being 0
        floor = torch.tensor([math.log(p.min_p) if p.min_p > 0 else -math.inf for p in params], device=device)
        scaled = torch.where(scaled >= floor[:, None], scaled, float("-inf"))
    if any((p.top_k is not None and p.top_k < V) or (p.top_p is not None and p.top_p < 1) for p in params):
        scaled = _filter(scaled, params)
    noise = torch.stack([_gumbel(V, g, device) for g in generators])  # (B, V)
    return torch.where(greedy, logits.argmax(-1), (scaled + noise).argmax(-1))


def _filter(scaled: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """``scaled`` with the tokens each row's top-k, then top-p, leaves out set to -inf."""
    B, V = scaled.shape
    device = scaled.device
    top_k = torch.tensor([p.top_k if p.top_k is not None else V for p in params], device=device)
    top_p = torch.tensor([p.top_p if p.top_p is not None else 1.0 for p in params], device=device)
    ordered, order = scaled.sort(-1, descending=True)  # (B, V)
    keep = torch.arange(V, device=device)[None] < top_k[:, None]
    probs = torch.where(keep, ordered, float("-inf")).softmax(-1)
    # a token goes once the tokens before it already hold top_p of the mass
    keep &= probs.cumsum(-1) - probs <= top_p[:, None]
    return torch.full_like(scaled, float("-inf")).scatter(-1, order, torch.where(keep, ordered, float("-inf")))


def _gumbel(size: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    u = torch.rand(size, generator=generator, device=device)
    return -torch.log(-torch.log(u))  # u = 0 gives -inf: that token is never drawn
