"""Building the engine ``griffon serve`` runs from its options, and the client that runs it
(:func:`engine_client`): in a process of its own (the default) or on a thread of the caller's."""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields

from griffon.engine.client import EngineClient, InprocClient
from griffon.engine.core import Engine
from griffon.engine.logs import configure_logging
from griffon.engine.process import EngineProcess


@dataclass(frozen=True)
class EngineOptions:
    """What the engine is built from (``griffon serve``'s engine flags, where their defaults are;
    picklable, for the engine's process)."""

    model: str
    device: str
    max_prompt_tokens: int | None
    max_batch: int
    max_queue: int
    step_tokens: int
    prefill_chunk: int
    max_tokens: int | None
    max_logprob_entries: int | None
    request_timeout: float | None
    prefix_cache_mb: float
    step: str

    @classmethod
    def of(cls, values: dict) -> EngineOptions:
        """The options among ``values`` (``vars(args)`` of ``griffon serve``, whose flags hold the
        defaults), the rest left out."""
        return cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})


def build_engine(options: EngineOptions) -> Engine:
    """The engine of ``options``: the model opened for inference, its structured FFNs' merge
    thresholds calibrated on this machine, the prompt limit from the memory free when none is given
    (:func:`~griffon.engine.limits.default_max_prompt_tokens`)."""
    from griffon.checkpoint import load_for_inference
    from griffon.decode import calibrate_merge_thresholds
    from griffon.engine import limits
    from griffon.machine import free_memory

    log = configure_logging()
    model, tokenizer = load_for_inference(options.model, device=options.device)
    calibrate_merge_thresholds(model)
    max_prompt = options.max_prompt_tokens
    if max_prompt is None:
        memory = int(limits.MEMORY_SHARE * free_memory(model.embed.weight.device))
        max_prompt = limits.default_max_prompt_tokens(
            model, options.max_batch, options.max_queue, options.step_tokens, memory
        )
        log.info("--max-prompt-tokens %d: fits %.1f GB (half the free memory)", max_prompt, memory / 1e9)
        if max_prompt < options.prefill_chunk:
            log.warning(
                "%d slots of this model hardly fit %.1f GB: prompts are limited to %d tokens; "
                "lower --max-batch, or set --max-prompt-tokens", options.max_batch, memory / 1e9, max_prompt
            )  # fmt: skip
    request_limits = limits.Limits(
        max_prompt_tokens=max_prompt, max_tokens=options.max_tokens,
        max_logprob_entries=options.max_logprob_entries, request_timeout=options.request_timeout,
    )  # fmt: skip
    return Engine(
        model, tokenizer, max_batch=options.max_batch, max_queue=options.max_queue,
        prefill_chunk=options.prefill_chunk, step_tokens=options.step_tokens,
        prefix_cache_bytes=int(options.prefix_cache_mb * 2**20), step=options.step, limits=request_limits,
    )  # fmt: skip


def engine_client(options: EngineOptions, in_process: bool = False) -> EngineClient:
    """The client of the engine of ``options``: in a process of its own (its tokenizer read here
    first, so a bad model is told before the process starts), or with ``in_process`` on a thread of
    this one; not started yet."""
    if in_process:
        return InprocClient(build_engine(options))
    from griffon.checkpoint import open_source_with_tokenizer

    tokenizer = open_source_with_tokenizer(options.model).tokenizer
    return EngineProcess(functools.partial(build_engine, options), tokenizer)
