"""Prefix-state cache: a prompt's decode state at chunk boundaries, reused by later prompts.

A Griffin or Hawk cache has a fixed size whatever the prompt's length (the recurrences' states and
the local-attention window), so a snapshot costs O(window) memory, not O(prompt). Snapshots are
taken where a prompt's prefill crosses a multiple of ``chunk`` tokens and keyed by a hash chain of
the chunks (key_k = H(key_{k-1}, chunk_k)), so a lookup walks a new prompt's chunks once.

A snapshot's tokens are kept as a :class:`Prefix`: the last chunk and a link to the prefix before
it, shared with every longer prefix of the same prompt, so a prompt of n tokens costs O(n) tokens
in all, not one copy per boundary (O(n^2 / chunk)). A hit is checked chunk by chunk against the
new prompt, so a hash collision cannot return a wrong state.

Memory is bounded: entries are evicted least recently used first, counted by their state's bytes
plus the tokens they keep alive; and one request's snapshots may take at most a share of the
cache (:data:`REQUEST_SHARE`), so one long prompt cannot flush the prefixes that others share.

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

# The largest part of the cache's bytes the snapshots of one request may take.
REQUEST_SHARE = 0.25
# Bytes a snapshot is charged per token of its prefix: the int64 tokens it may keep alive.
BYTES_PER_TOKEN = 8


def chain_hash(key: bytes, block: bytes) -> bytes:
    """The hash chain's next key: H(previous key, this chunk's tokens)."""
    return hashlib.blake2b(key + block, digest_size=16).digest()


@dataclass(frozen=True, eq=False)
class Prefix:
    """A prompt's first ``end`` tokens (a multiple of the chunk): the hash chain's key, the last
    chunk's tokens (int64 bytes) and the prefix before it (``None`` for the empty prefix)."""

    end: int
    key: bytes
    block: bytes
    parent: Prefix | None

    def extend(self, tokens: list[int]) -> Prefix:
        """This prefix followed by ``tokens`` (one chunk)."""
        block = np.asarray(tokens, dtype=np.int64).tobytes()
        return Prefix(self.end + len(tokens), chain_hash(self.key, block), block, self)

    def spells(self, blocks: list[bytes]) -> bool:
        """True if this prefix's chunks are ``blocks`` (a prompt's first chunks, as int64 bytes)."""
        node, i = self, len(blocks) - 1
        while node.parent is not None:
            if i < 0 or node.block != blocks[i]:
                return False
            node, i = node.parent, i - 1
        return i == -1


EMPTY = Prefix(0, b"", b"", None)


@dataclass
class Snapshot:
    """The single-row cache after ``prefix``, and that position's logits (1, V)."""

    prefix: Prefix
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

    @property
    def request_bytes(self) -> int:
        """The bytes one request's snapshots may take (:data:`REQUEST_SHARE` of the cache)."""
        return int(self.max_bytes * REQUEST_SHARE)

    def lookup(self, prompt: list[int]) -> Snapshot | None:
        """The longest cached prefix of ``prompt`` (a copy of its state: the caller may advance it), or None."""
        self.lookups += 1
        tokens = np.asarray(prompt, dtype=np.int64)
        blocks = [tokens[i : i + self.chunk].tobytes() for i in range(0, len(prompt) - self.chunk + 1, self.chunk)]
        keys, key = [], b""
        for block in blocks:
            key = chain_hash(key, block)
            keys.append(key)
        for k in range(len(keys), 0, -1):
            entry = self._entries.get(keys[k - 1])
            if entry is not None and entry.prefix.end == k * self.chunk and entry.prefix.spells(blocks[:k]):
                self._entries.move_to_end(keys[k - 1])
                self.hits += 1
                self.tokens_reused += entry.prefix.end
                return Snapshot(entry.prefix, entry.cache.clone(), entry.logits, entry.nbytes)
        return None

    def insert(self, prefix: Prefix, cache: Cache, logits: torch.Tensor, allowance: int | None = None) -> int:
        """Keep a copy of ``cache``, the state after ``prefix``, unless it would take more than
        ``allowance`` bytes (default: the whole cache). Returns the bytes it took (0: not kept)."""
        if prefix.end == 0 or prefix.end % self.chunk:
            raise ValueError(f"snapshots are taken at multiples of {self.chunk} tokens, not at {prefix.end}")
        if prefix.key in self._entries:
            self._entries.move_to_end(prefix.key)
            return 0
        nbytes = cache.nbytes() + logits.nbytes + BYTES_PER_TOKEN * prefix.end
        if nbytes > min(self.max_bytes, self.max_bytes if allowance is None else allowance):
            return 0
        self._entries[prefix.key] = Snapshot(prefix, cache.clone(), logits.clone(), nbytes)
        self.nbytes += nbytes
        while self.nbytes > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self.nbytes -= old.nbytes
        return nbytes

    def clear(self) -> None:
        """Drop every snapshot (the counters stay)."""
        self._entries.clear()
        self.nbytes = 0

    def __contains__(self, key: bytes) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)
