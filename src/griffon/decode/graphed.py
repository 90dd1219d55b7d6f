"""The model's own decode step replayed from a CUDA graph: ``generate(..., step="graph")``.

A decode step runs a few small kernels per layer on a few rows each: on a GPU, launching them, not
arithmetic or memory traffic, bounds it at small batches. A CUDA graph replays the whole step as
one launch. Graphs need fixed shapes and addresses, so each batch size is captured once against
static buffers: the tokens, and a cache that the graph advances in place. The caller's cache is
made to alias those buffers (copied in when it does not already), so consecutive steps copy
nothing; clone a cache to keep it as a snapshot. A global-attention cache grows every step and
cannot be captured: such models are refused.
"""

from __future__ import annotations

import torch

from griffon.model import Cache, Griffon
from griffon.nn.attention import Attention


def _copy_into(dst: Cache, src: Cache) -> None:
    for d, s in zip(dst.tensors(), src.tensors(), strict=True):
        if d.data_ptr() != s.data_ptr():
            d.copy_(s)


class GraphedStep:
    """``step(tokens (B,), cache) -> logits (B, V)``: the model's step, one CUDA graph per batch size."""

    def __init__(self, model: Griffon) -> None:
        reason = self.reason(model)
        if reason is not None:
            raise ValueError(f"the graph decode step does not apply: {reason}")
        self.model = model
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, Cache, torch.Tensor]] = {}

    @staticmethod
    def reason(model: Griffon) -> str | None:
        """Why ``model`` cannot be decoded through CUDA graphs, or None if it can."""
        if model.embed.weight.device.type != "cuda":
            return "CUDA graphs need the model on a CUDA device"
        if any(isinstance(b.temporal, Attention) and b.temporal.history is None for b in model.blocks):
            return "a global-attention cache grows every step, and a graph needs fixed shapes"
        return None

    def _advance(self, tokens: torch.Tensor, cache: Cache) -> torch.Tensor:
        logits, new = self.model(tokens[:, None], cache=cache)
        _copy_into(cache, new)
        return logits[:, -1]

    def _capture(self, cache: Cache):
        static = cache.clone()
        tokens = torch.zeros(cache.batch_size, dtype=torch.long, device=cache.position.device)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: lazy initialisations must not happen during capture
            for _ in range(2):
                self._advance(tokens, static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = self._advance(tokens, static)
        return graph, tokens, static, logits

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, cache: Cache) -> torch.Tensor:
        B = cache.batch_size
        if B not in self._graphs:
            self._graphs[B] = self._capture(cache)
        graph, static_tokens, static, logits = self._graphs[B]
        _copy_into(static, cache)  # nothing to copy when the cache already aliases the buffers
        static_tokens.copy_(tokens)
        graph.replay()
        cache.advance_to(Cache(blocks=list(static.blocks), position=static.position, segment_pos=static.segment_pos))
        return logits.clone()  # the buffer is overwritten by the next replay
