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

import math
from collections.abc import Sequence
from dataclasses import dataclass

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
    presence_penalty: float = 0.0  # OpenAI's: subtracted from each token already in the output
    frequency_penalty: float = 0.0  # OpenAI's: subtracted once per time a token is in the output
    repetition_penalty: float = 1.0  # vLLM's: > 1 discourages the prompt's and output's tokens
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) pairs added to the logits
    min_p: float = 0.0  # vLLM's: keep tokens at least this share of the likeliest one's probability
    min_tokens: int = 0  # vLLM's: no EOS, stop token or stop string before this many tokens
    score: bool = False  # keep the sum of the chosen tokens' log-probabilities (``best_of`` ranks by it)

    @property
    def adjusts_logits(self) -> bool:
        """Whether :func:`adjust_logits` changes this row's logits."""
        return bool(
            self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
            or self.logit_bias or self.min_tokens
        )  # fmt: skip

    def validate(self) -> None:
        """Raise ValueError naming the first parameter out of range."""
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {self.max_tokens}")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens = 0 generates nothing; it is allowed only with echo")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be finite and >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 (or unset), got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")
        if self.seed is not None and not SEED_MIN <= self.seed <= SEED_MAX:
            raise ValueError(f"seed must lie in [{SEED_MIN}, {SEED_MAX}], got {self.seed}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must lie in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not (math.isfinite(value) and -2 <= value <= 2):
                raise ValueError(f"{name} must lie in [-2, 2], got {value}")
        if not (math.isfinite(self.repetition_penalty) and 0 < self.repetition_penalty <= MAX_REPETITION_PENALTY):
            raise ValueError(
                f"repetition_penalty must lie in (0, {MAX_REPETITION_PENALTY}], got {self.repetition_penalty}"
            )
        for token, bias in self.logit_bias:
            if not (math.isfinite(bias) and -100 <= bias <= 100):
                raise ValueError(f"logit_bias of token {token} must lie in [-100, 100], got {bias}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must lie in [0, 1], got {self.min_p}")
        if not 0 <= self.min_tokens <= self.max_tokens:
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
