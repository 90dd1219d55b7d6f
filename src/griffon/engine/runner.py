"""The serving engine's model runner: prefill forwards over prompt chunks and the decode step over
the running batch, with the batch's cache. Tensors and caches only: which requests, in which rows,
is the scheduler's (:mod:`griffon.engine.scheduler`); what their tokens become, the output's
(:mod:`griffon.engine.output`).

A Griffin or Hawk cache has a fixed size, so a request joins the batch (:meth:`Cache.stack`) or
leaves it (:meth:`Cache.select`) at the cost of copying a few states, and its row is reused at once.
"""

from __future__ import annotations

import torch

from griffon.decode.steps import make_step
from griffon.model import Cache, Griffon


class ModelRunner:
    """Runs ``model`` for the engine: ``step`` names the decode step (:data:`griffon.decode.STEPS`)."""

    def __init__(self, model: Griffon, step: str = "auto") -> None:
        self.model = model.eval()
        self.device = model.embed.weight.device
        self._decode_step = make_step(model, step)
        self.batch: Cache | None = None
        """The running requests' caches, one row each, in the scheduler's row order."""

    def new_cache(self) -> Cache:
        """An empty cache for one prompt."""
        return self.model.init_cache(1)

    def prefill(
        self, chunks: list[list[int]], starts: list[int], caches: list[Cache], all_logits: bool
    ) -> tuple[torch.Tensor, list[Cache]]:
        """One forward over a chunk of each prompt (all of one length n), chunk ``i`` starting at
        position ``starts[i]`` after ``caches[i]``: the logits (len(chunks), n, V) with
        ``all_logits``, else those of the last position (len(chunks), 1, V), and each prompt's
        advanced cache. The cache of a single prompt is consumed; a group's are copied."""
        n = len(chunks[0])
        tokens = torch.tensor(chunks, device=self.device)  # (G, n)
        segment_pos = torch.stack([torch.arange(s, s + n, device=self.device) for s in starts])  # (G, n)
        cache = caches[0] if len(caches) == 1 else Cache.stack(caches)
        logits, cache = self.model(tokens, segment_pos, cache=cache, last_only=not all_logits)
        if len(caches) == 1:
            return logits, [cache]
        return logits, [cache.select(torch.tensor([i], device=self.device)) for i in range(len(caches))]

    def join(self, cache: Cache) -> None:
        """Add a prefilled prompt's cache as the batch's last row."""
        self.batch = cache if self.batch is None else Cache.stack([self.batch, cache])

    def decode(self, tokens: list[int]) -> torch.Tensor:
        """Advance every row of the batch by its token (one per row, in row order): the next
        logits (B, V). On failure the rows' states may be half-advanced."""
        return self._decode_step(torch.tensor(tokens, device=self.device), self.batch)

    def drop_rows(self, rows: list[int]) -> None:
        """Drop rows of the batch (the scheduler has dropped their requests)."""
        if not rows:
            return
        gone = set(rows)
        keep = [i for i in range(self.batch.batch_size) if i not in gone]
        self.batch = self.batch.select(torch.tensor(keep, device=self.device)) if keep else None

    def clear(self) -> None:
        self.batch = None
