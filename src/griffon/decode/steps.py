"""The decode step: ``step(tokens (B,), cache) -> logits (B, V)``, advancing ``cache``, chosen by name.

* ``model``: the model's own forward on one token per row, the reference every other step is
  tested against (the single-token branches of :mod:`griffon.nn.attention`, :mod:`griffon.nn.conv1d`
  and the scan);
* ``fused``: the fused CPU kernels (:mod:`griffon.decode.fused`), float32 on the CPU;
* ``compiled``: the model's step under ``torch.compile`` (:mod:`griffon.decode.compiled`);
* ``graph``: the model's step replayed from a CUDA graph per batch size (:mod:`griffon.decode.graphed`),
  for models with a fixed-size cache on a GPU;
* ``auto``: ``fused`` where it covers the model and its merged weights' copy stays under
  :data:`AUTO_FUSE_MAX_BYTES`, else ``model``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from griffon.decode.compiled import compiled_step
from griffon.decode.fused import FusedDecoder
from griffon.decode.graphed import GraphedStep
from griffon.model import Cache, Griffon

Step = Callable[[torch.Tensor, Cache], torch.Tensor]
STEPS = ("auto", "model", "fused", "compiled", "graph")
# The fused step keeps merged copies of the weight matrices; ``auto`` fuses up to this size.
AUTO_FUSE_MAX_BYTES = 2**30


def model_step(model: Griffon) -> Step:
    """The model's own forward on one token per row."""

    def step(tokens: torch.Tensor, cache: Cache) -> torch.Tensor:
        logits, new = model(tokens[:, None], cache=cache)
        cache.advance_to(new)
        return logits[:, -1]

    return step


def make_step(model: Griffon, step: str = "auto") -> Step:
    """The decode step named ``step`` (one of :data:`STEPS`) for ``model``. ``fused`` raises
    ``ValueError`` where the kernels do not cover the model; ``compiled`` compiles on the first
    call of each batch size."""
    if step not in STEPS:
        raise ValueError(f"step {step!r} is not one of {STEPS}")
    if step == "compiled":
        return compiled_step(model)
    if step == "fused":
        return FusedDecoder(model).step
    if step == "graph":
        return GraphedStep(model).step
    if step == "auto" and FusedDecoder.reason(model) is None:
        size = sum(p.numel() * p.element_size() for p in model.parameters())
        if size <= AUTO_FUSE_MAX_BYTES:
            return FusedDecoder(model).step
    return model_step(model)
