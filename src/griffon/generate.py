"""Sampling from a model: chunked prefill through the cache, then single-token steps."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from griffon.model import Griffon


def sample_next(
    logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None, generator
) -> torch.Tensor:
    """Pick the next token from (B, V) logits: greedy at temperature 0, else filtered sampling."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # drop a token once the tokens before it already hold top_p of the mass
        drop = probs.cumsum(-1) - probs > top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def stream_tokens(
    model: Griffon,
    prompt: list[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    prefill_chunk: int = 1024,
    stop_ids: set[int] | None = None,
) -> Iterator[int]:
    """Yield generated token ids one at a time for a single prompt."""
    if not prompt:
        raise ValueError("the prompt must contain at least one token")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    device = model.embed.weight.device
    generator = torch.Generator(device=device)
    if seed is not None:
        generator.manual_seed(seed)
    model.eval()
    cache = model.init_cache(1)
    tokens = torch.tensor([prompt], device=device)
    for start in range(0, tokens.shape[1], prefill_chunk):
        logits, cache = model(tokens[:, start : start + prefill_chunk], cache=cache)
    for _ in range(max_new_tokens):
        nxt = sample_next(logits[:, -1], temperature, top_k, top_p, generator)
        token = int(nxt.item())
        yield token
        if stop_ids and token in stop_ids:
            return
        logits, cache = model(nxt[:, None], cache=cache)
