"""Prefix-state cache: a prompt's decode state at chunk boundaries, reused by later prompts.

A Griffin or Hawk cache has a fixed size whatever the prompt's length (the recurrences' states and
the local-attention window), so a snapshot costs O(window) memory, not O(prompt). Snapshots are
taken where a prompt's prefill crosses a multiple of ``chunk`` tokens and keyed by a hash chain of
the chunks (key_k = H(key_{k-1}, chunk_k)), so a lookup walks a new prompt's chunks once. The
tokens are stored beside each snapshot and compared on a hit: a hash collision cannot return a
wrong state. Entries are evicted least recently used first, bounded by their bytes.

Resuming is exact: the engine prefills every prompt in chunks aligned to multiples of ``chunk``
from its start, so the state at a boundary is the same computation whether it was reached now or
restored from a snapshot; the snapshot also keeps the last logits, for prompts that end there.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from griffon.model import Cache


@dataclass
class Snapshot:
    """The single-row cache after ``len(tokens)`` prompt tokens, and that position's logits (1, V)."""

    tokens: tuple[int, ...]
    cache: Cache
    logits: torch.Tensor
    nbytes: int


class PrefixCache:
    """Snapshots of prompt states at multiples of ``chunk`` tokens, at most ``max_bytes`` in all."""

    def __init__(self, max_bytes: int, chunk: int) -> None:
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        self.max_bytes = max_bytes
        self.chunk = chunk
        self.nbytes = 0
        self.lookups = 0
        self.hits = 0
        self.tokens_reused = 0
        self._entries: OrderedDict[bytes, Snapshot] = OrderedDict()

    def keys(self, prompt: list[int]) -> list[tuple[int, bytes]]:
        """``(end, key)`` of every chunk boundary ``end`` <= len(prompt), shortest first."""
        out, key = [], b""
        for end in range(self.chunk, len(prompt) + 1, self.chunk):
            block = np.asarray(prompt[end - self.chunk : end], dtype=np.int64).tobytes()
            key = hashlib.blake2b(key + block, digest_size=16).digest()
            out.append((end, key))
        return out

    def lookup(self, prompt: list[int]) -> Snapshot | None:
        """The longest cached prefix of ``prompt`` (a copy of its state: the caller may advance it), or None."""
        self.lookups += 1
        for end, key in reversed(self.keys(prompt)):
            entry = self._entries.get(key)
            if entry is not None and entry.tokens == tuple(prompt[:end]):
                self._entries.move_to_end(key)
                self.hits += 1
                self.tokens_reused += end
                return Snapshot(entry.tokens, entry.cache.clone(), entry.logits, entry.nbytes)
        return None

    def insert(self, prompt: list[int], end: int, cache: Cache, logits: torch.Tensor) -> None:
        """Keep a copy of ``cache``, the state after ``prompt[:end]`` (``end`` a multiple of ``chunk``)."""
        if end % self.chunk or end == 0 or end > len(prompt):
            raise ValueError(f"snapshots are taken at multiples of {self.chunk} tokens, not at {end}")
        key = self.keys(prompt[:end])[-1][1]
        if key in self._entries:
            self._entries.move_to_end(key)
            return
        nbytes = cache.nbytes() + logits.nbytes
        if nbytes > self.max_bytes:
            return
        self._entries[key] = Snapshot(tuple(prompt[:end]), cache.clone(), logits.clone(), nbytes)
        self.nbytes += nbytes
        while self.nbytes > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self.nbytes -= old.nbytes

    def __len__(self) -> int:
        return len(self._entries)
