"""Sampling from a model: chunked prefill through the cache, then single-token decode steps."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch

from griffon.data.tokenizers import Tokenizer
from griffon.decode.output import TextStream, append_token
from griffon.decode.sampling import SamplingParams, check_prompt, sample
from griffon.decode.steps import make_step
from griffon.model import Cache, Griffon


class GenerationError(RuntimeError):
    """Generation cannot go on: the model's output is not usable (NaN or infinite logits)."""


def _check_logits(logits: torch.Tensor, step: int) -> None:
    if not torch.isfinite(logits).all():
        rows = (~torch.isfinite(logits)).any(-1).nonzero().flatten().tolist()
        where = "after the prompt" if step == 0 else f"at generated token {step}"
        raise GenerationError(
            f"the model produced NaN or infinite logits {where} (rows {rows[:8]}): its weights or "
            "activations overflowed; check the checkpoint (griffon info) or sample in float32"
        )


def _prefill_batch(model: Griffon, prompts: Sequence[Sequence[int]], chunk: int) -> tuple[torch.Tensor, Cache]:
    """Run prompts through one batch of caches in chunks; return their last logits (n, V) and the cache.

    Shorter prompts are left-padded, the padding a document of its own: each prompt starts a new
    document (``segment_pos`` 0) at its first token, where the recurrence and convolution restart
    and attention stops looking back, so no padding reaches a prompt's state or logits. Positions
    inside the document (RoPE) are the same as without padding.
    """
    device = model.embed.weight.device
    T = max(len(p) for p in prompts)
    tokens = torch.zeros(len(prompts), T, dtype=torch.long, device=device)  # (n, T)
    segment_pos = torch.arange(T, device=device).repeat(len(prompts), 1)  # (n, T)
    for row, p in enumerate(prompts):
        pad = T - len(p)
        tokens[row, pad:] = torch.as_tensor(list(p), device=device)
        segment_pos[row, pad:] -= pad
    cache = model.init_cache(tokens.shape[0])
    for start in range(0, T, chunk):
        span = slice(start, start + chunk)
        logits, cache = model(tokens[:, span], segment_pos[:, span], cache=cache, last_only=True)
    return logits[:, -1], cache


def prefill(
    model: Griffon, prompts: Sequence[Sequence[int]], chunk: int = 1024, pad: bool = False
) -> tuple[torch.Tensor, Cache]:
    """Run prompts of any lengths through a fresh cache in chunks of ``chunk`` tokens; return
    their last logits (B, V) and the cache.

    By default prompts of equal length go together, as one batch, and the caches are then stacked
    back into the prompts' order: no compute is spent on padding, which suits a few prompts of
    very different lengths. With ``pad``, all prompts run as one batch, the shorter ones
    left-padded by a document of their own that no prompt can see: fewer, larger calls, which
    suits many prompts of similar lengths (scoring). Both give the same logits and states, to
    float rounding.
    """
    if pad:
        return _prefill_batch(model, prompts, chunk)
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(len(p), []).append(i)
    parts = [(rows, *_prefill_batch(model, [prompts[i] for i in rows], chunk)) for rows in groups.values()]
    logits = torch.cat([part[1] for part in parts])  # (B, V) in group order
    cache = Cache.stack([part[2] for part in parts])
    order = [i for part in parts for i in part[0]]
    if order == sorted(order):
        return logits, cache
    back = torch.argsort(torch.tensor(order, device=logits.device))
    return logits[back], cache.select(back)


def length_limit(config) -> int | None:
    """The longest prompt + generation a model takes: a global-attention model's ``max_seq_len``
    (its cache and positions stop there); recurrent and local-attention models have none."""
    return config.max_seq_len if config.has_global_attention else None


def _validate(model: Griffon, prompts: Sequence[Sequence[int]], params: SamplingParams) -> None:
    if not prompts:
        raise ValueError("no prompts given")
    params.validate()
    for i, p in enumerate(prompts):
        try:
            check_prompt([int(t) for t in p], model.config.vocab_size, length_limit(model.config), params.max_tokens)
        except ValueError as e:
            raise ValueError(f"prompt {i}: {e}") from None


@torch.inference_mode()
def generate_stream(
    model: Griffon,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    eos_id: int | None = None,
    stop_sequences: Sequence[Sequence[int]] = (),
    prefill_chunk: int = 1024,
    stop_check: Callable[[int, list[int]], bool] | None = None,
    step: str = "auto",
) -> Iterator[list[int | None]]:
    """Generate for a batch of prompts of any lengths; yield, per step, each row's new token
    (``None`` for rows that have stopped).

    Prompts are prefilled through the cache in chunks of ``prefill_chunk`` (:func:`prefill`); then
    all rows advance together with their own positions, by the decode step named ``step``
    (:func:`~griffon.decode.steps.make_step`: ``auto``, ``model``, ``fused``, ``compiled`` or ``graph``). A
    row stops at ``eos_id`` (which it emits), after emitting one of ``stop_sequences``, when
    ``stop_check(row, tokens_so_far)`` returns True (stop strings, see :func:`generate_text`), or
    after ``max_new_tokens``: the serving engine's rules (:func:`~griffon.decode.output.append_token`),
    with token sequences and a check of the caller's besides. The model is not changed (structured FFNs decode with the
    ``merge_threshold`` they have: see :func:`~griffon.decode.calibration.calibrate_merge_thresholds`).
    Raises :class:`GenerationError` if the model's logits are NaN or infinite.
    """
    params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    _validate(model, prompts, params)
    model.eval()
    device = model.embed.weight.device
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else torch.seed())
    logits, cache = prefill(model, prompts, prefill_chunk)  # (B, V)
    _check_logits(logits, 0)
    decode_step = make_step(model, step)
    B = len(prompts)
    active = [True] * B
    produced: list[list[int]] = [[] for _ in range(B)]
    for step in range(max_new_tokens):
        nxt = sample(logits, [params] * B, [generator] * B)  # (B,): the rows draw in turn from one stream
        out: list[int | None] = []
        for b in range(B):
            if not active[b]:
                out.append(None)
                continue
            token = int(nxt[b])
            out.append(token)
            reason = append_token(params, produced[b], None, token, eos_id)  # the engine's rules
            stopped = reason == "stop" or any(produced[b][-len(s) :] == list(s) for s in stop_sequences if s)
            if not stopped and stop_check is not None:
                stopped = stop_check(b, produced[b])
            active[b] = not (stopped or reason == "length")
        yield out
        if not any(active) or step == max_new_tokens - 1:
            return
        logits = decode_step(nxt, cache)
        _check_logits(logits, step + 1)


def generate(model: Griffon, prompts: Sequence[Sequence[int]], max_new_tokens: int, **kwargs) -> list[list[int]]:
    """The new tokens of every row (see :func:`generate_stream` for the arguments)."""
    rows: list[list[int]] = [[] for _ in prompts]
    for step in generate_stream(model, prompts, max_new_tokens, **kwargs):
        for row, token in zip(rows, step, strict=True):
            if token is not None:
                row.append(token)
    return rows


def stream_tokens(
    model: Griffon,
    prompt: list[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    prefill_chunk: int = 1024,
    eos_id: int | None = None,
    step: str = "auto",
) -> Iterator[int]:
    """Yield generated token ids one at a time for a single prompt."""
    stream = generate_stream(
        model, [prompt], max_new_tokens, temperature, top_k, top_p, seed, eos_id, (), prefill_chunk, step=step
    )
    for step in stream:
        if step[0] is not None:
            yield step[0]


def generate_text(
    model: Griffon,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int,
    stop_strings: Sequence[str] = (),
    max_prompt_tokens: int | None = None,
    **kwargs,
) -> list[str]:
    """Continue text prompts; each row stops at the tokenizer's EOS, after ``max_new_tokens``, or
    at the first of ``stop_strings``, which is cut off with everything after it. With
    ``max_prompt_tokens``, a longer prompt keeps its last that many tokens. Other arguments as
    :func:`generate_stream`."""
    streams = [TextStream(tokenizer, stop_strings) for _ in prompts]

    def hit(row: int, tokens: list[int]) -> bool:
        streams[row].push(tokens[-1])
        return streams[row].done

    ids = [tokenizer.encode(p) for p in prompts]
    if max_prompt_tokens is not None:
        ids = [row[-max_prompt_tokens:] for row in ids]
    generate(model, ids, max_new_tokens, eos_id=tokenizer.eos_id, stop_check=hit, **kwargs)
    return [s.text for s in streams]
