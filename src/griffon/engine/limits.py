"""What one request may ask of the server, and the defaults: the prompt's length, ``max_tokens``,
the log-probabilities an answer carries, the body's size and the time a request may run.

The prompt limit's default comes from memory. Prefill runs in chunks, so a Griffin or Hawk request
holds a fixed-size state whatever its prompt's length; what grows with the prompt is its token ids
on the host and, for models with global attention, the key/value cache (and one chunk's attention
scores against it). The default is the largest prompt such that every slot of the batch holding
a prompt that long, and every waiting request holding its ids, fits in :data:`MEMORY_SHARE` of the
memory free on the model's device when the server starts, capped at :data:`PROMPT_CAP` tokens
(docs/serving.md, "Limits and security", has the arithmetic for the shipped presets).
"""

from __future__ import annotations

from dataclasses import dataclass

from griffon.model import Griffon
from griffon.nn.attention import Attention

# Defaults of the server's flags.
DEFAULT_MAX_TOKENS = 4096  # --max-tokens: the most tokens one request may generate
DEFAULT_MAX_LOGPROB_ENTRIES = 2**18  # --max-logprob-entries: (scored tokens) x (logprobs + 1)
DEFAULT_REQUEST_TIMEOUT = 300.0  # --request-timeout: seconds from arrival to the last token
DEFAULT_MAX_BODY_BYTES = 8 * 2**20  # --max-body-mb: a request body's bytes
# --stall-timeout: seconds of the engine's silence, while requests are pending, after which /health
# and new requests answer 503 (an engine step of the shipped models on a CPU takes well under a second).
DEFAULT_STALL_TIMEOUT = 30.0
# Choices per prompt (``n``, ``best_of``) as OpenAI bounds ``n``.
MAX_CHOICES = 128
# The schema's bounds on a body's lists, checked as it is parsed, so that a body of millions of
# items is refused before any of them is tokenised: prompts in one request, messages in one
# chat, stop strings and stop token ids. A prompt of token ids is bounded by PROMPT_CAP.
MAX_PROMPTS = 1024
MAX_MESSAGES = 1024
MAX_STOPS = 64
# --body-timeout: seconds from a request's start until its body must have arrived whole.
DEFAULT_BODY_TIMEOUT = 30.0
# --max-connections: open connections and running requests the server holds; beyond, 503.
DEFAULT_MAX_CONNECTIONS = 1024
PROMPT_CAP = 2**17  # --max-prompt-tokens never defaults above this
MEMORY_SHARE = 0.5  # of the device's free memory at start, for the requests' prompt-dependent memory
# Host bytes per prompt token while a request is queued or running: its ids as a Python list
# (8-byte pointers, 28-byte ints past the small-int cache), the prefix chain's int64 copy and the
# tokenizer's transient copies, rounded up.
HOST_BYTES_PER_TOKEN = 64


class LimitExceeded(ValueError):
    """A request asks for more than a server limit allows; the message names the limit and the value."""


@dataclass(frozen=True)
class Limits:
    """Bounds on one request (``None``: unbounded, as for offline use of the engine)."""

    max_prompt_tokens: int | None = None
    max_tokens: int | None = None
    max_logprob_entries: int | None = None
    request_timeout: float | None = None

    def __post_init__(self) -> None:
        for name in ("max_prompt_tokens", "max_tokens", "max_logprob_entries", "request_timeout"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0 (or None), got {value}")

    def check(self, prompt_tokens: int, max_tokens: int, logprobs: int | None, echo: bool, choices: int = 1) -> None:
        """Raise :class:`LimitExceeded` if a request of this size, with ``choices`` completions of
        its prompt (``best_of``), is over a limit: every choice counts."""
        if self.max_prompt_tokens is not None and prompt_tokens > self.max_prompt_tokens:
            raise LimitExceeded(
                f"the prompt has {prompt_tokens} tokens; this server's limit is max_prompt_tokens={self.max_prompt_tokens}"
            )
        if self.max_tokens is not None and choices * max_tokens > self.max_tokens:
            asked = f"max_tokens is {max_tokens}" if choices == 1 else f"{choices} choices x max_tokens {max_tokens}"
            raise LimitExceeded(f"{asked}; this server's limit is max_tokens={self.max_tokens}")
        if logprobs is not None and self.max_logprob_entries is not None:
            entries = choices * ((prompt_tokens if echo else 0) + max_tokens) * (logprobs + 1)
            if entries > self.max_logprob_entries:
                per = "choices x " if choices > 1 else ""
                raise LimitExceeded(
                    f"this request asks for {entries} log-probabilities ({per}(prompt tokens if echo + max_tokens) x "
                    f"(logprobs + 1)); this server's limit is max_logprob_entries={self.max_logprob_entries}"
                )


def cache_bytes_per_token(model: Griffon) -> int:
    """Bytes a request's cache grows by per token of context: the keys, values and positions of
    every global-attention block (recurrent and local-attention states have a fixed size)."""
    elem = model.embed.weight.element_size()
    per_token = 0
    for block in model.blocks:
        t = block.temporal
        if isinstance(t, Attention) and t.history is None:
            per_token += 2 * t.num_kv_heads * t.head_dim * elem + 8  # keys, values; int64 position
    return per_token


def attention_score_bytes_per_token(model: Griffon, step_tokens: int) -> int:
    """Bytes one engine iteration's prefill (``step_tokens`` queries) may hold per token of context
    in a global-attention block's float32 scores (0 for models without global attention)."""
    heads = [
        b.temporal.num_heads for b in model.blocks if isinstance(b.temporal, Attention) and b.temporal.history is None
    ]
    return step_tokens * max(heads) * 4 if heads else 0


def default_max_prompt_tokens(
    model: Griffon, max_batch: int, max_queue: int, step_tokens: int, memory_bytes: int
) -> int:
    """The longest prompt such that ``max_batch`` running requests and ``max_queue`` waiting ones,
    each with a prompt that long, fit in ``memory_bytes`` (see the module docstring); at most
    :data:`PROMPT_CAP`, and below the model's ``max_seq_len`` if it has one."""
    per_token = max_batch * (cache_bytes_per_token(model) + HOST_BYTES_PER_TOKEN) + max_queue * HOST_BYTES_PER_TOKEN
    per_token += attention_score_bytes_per_token(model, step_tokens)
    fixed = max_batch * model.init_cache(1, device="meta").nbytes()
    n = max(int((memory_bytes - fixed) // per_token), 1)
    n = min(n, PROMPT_CAP)
    if model.config.max_seq_len is not None:
        n = min(n, model.config.max_seq_len - 1)
    return n
