"""The serving engine's scheduler: which requests wait, prefill and run, and what each iteration
prefills. Bookkeeping over requests only (no model, no tensors), so it is tested on its own.

Requests are admitted first come, first served while fewer than ``max_batch`` prefill or run; a
request is never preempted (a Griffin or Hawk state has a fixed size, so the batch never outgrows
its memory). Each iteration prefills the next chunk of the prefilling requests in admission order
under a budget of ``step_tokens`` prompt tokens (at least one chunk), so a long prompt is spread
over iterations instead of stalling the running requests' next tokens; chunks end at multiples of
``prefill_chunk`` from each prompt's start, so a prefix-cache snapshot is the same computation
whenever it is reached. Requests whose next chunks have the same length and kind (scored or not)
are grouped into one forward.
"""

from __future__ import annotations

import threading
from collections import deque

from griffon.engine.request import QueueFull, Request


class Scheduler:
    """The waiting queue, the prefilling requests and the running ones (in the batch's row order)."""

    def __init__(self, max_batch: int, max_queue: int, prefill_chunk: int, step_tokens: int) -> None:
        if max_batch < 1 or max_queue < 0 or prefill_chunk < 1 or step_tokens < 1:
            raise ValueError("max_batch, prefill_chunk and step_tokens must be >= 1, max_queue >= 0")
        self.max_batch, self.max_queue = max_batch, max_queue
        self.prefill_chunk, self.step_tokens = prefill_chunk, step_tokens
        self.lock = threading.Lock()  # guards ``waiting``: requests arrive from other threads
        self.waiting: deque[Request] = deque()
        self.prefilling: list[Request] = []
        self.running: list[Request] = []

    def enqueue(self, req: Request, bounded: bool = True) -> None:
        """Queue ``req`` (the caller holds :attr:`lock`); :class:`QueueFull` past ``max_queue``,
        unless not ``bounded`` (requests bounded elsewhere: a warm-up's, a front end's that
        counts what it sends)."""
        if bounded and len(self.waiting) >= self.max_queue:
            raise QueueFull(f"{len(self.waiting)} requests are waiting")
        self.waiting.append(req)

    @property
    def queue_length(self) -> int:
        return len(self.waiting)

    @property
    def in_flight(self) -> int:
        return len(self.prefilling) + len(self.running)

    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running)

    def admit(self) -> list[Request]:
        """Move waiting requests to prefilling, first come first served, while slots are free."""
        admitted = []
        with self.lock:
            while self.waiting and self.in_flight < self.max_batch:
                req = self.waiting.popleft()
                self.prefilling.append(req)
                admitted.append(req)
        return admitted

    def expire(self, now: float) -> tuple[list[tuple[Request, str]], list[int]]:
        """Take out the requests that were cancelled or passed their deadline: ``(request, reason)``
        for each, and the batch rows of those that were running (for the caller to drop)."""
        with self.lock:
            gone = [(r, why) for r in self.waiting if (why := r.reason_to_stop(now))]
            for r, _ in gone:
                self.waiting.remove(r)
        for r in list(self.prefilling):
            if why := r.reason_to_stop(now):
                self.prefilling.remove(r)
                gone.append((r, why))
        rows = [i for i, r in enumerate(self.running) if r.reason_to_stop(now)]
        gone += [(self.running[i], self.running[i].reason_to_stop(now)) for i in rows]
        self.drop_rows(rows)
        return gone, rows

    def next_chunk(self, req: Request) -> int:
        """Tokens of ``req``'s next prefill chunk: up to the next multiple of ``prefill_chunk``."""
        start = req.prefilled
        return min(len(req.prompt), (start // self.prefill_chunk + 1) * self.prefill_chunk) - start

    def prefill_groups(self) -> list[list[Request]]:
        """This iteration's prefill: the prefilling requests in admission order while the token
        budget lasts (at least one chunk), grouped by the next chunk's length and kind."""
        budget, groups = self.step_tokens, {}
        for req in self.prefilling:
            if budget <= 0:
                break
            n = self.next_chunk(req)
            budget -= n
            groups.setdefault((n, req.scores_prompt), []).append(req)
        return list(groups.values())

    def start_running(self, req: Request) -> None:
        """``req``'s prompt is in: it leaves prefilling for the last row of the running batch."""
        self.prefilling.remove(req)
        self.running.append(req)

    def remove(self, req: Request) -> int | None:
        """Take ``req`` out of prefilling or running; its batch row if it was running."""
        if req in self.prefilling:
            self.prefilling.remove(req)
        if req in self.running:
            row = self.running.index(req)
            self.drop_rows([row])
            return row
        return None

    def drop_rows(self, rows: list[int]) -> None:
        gone = set(rows)
        self.running = [r for i, r in enumerate(self.running) if i not in gone]

    def take_all(self) -> list[Request]:
        """Empty every queue; the requests that were in them."""
        with self.lock:
            waiting, self.waiting = list(self.waiting), deque()
        out = [*waiting, *self.prefilling, *self.running]
        self.prefilling, self.running = [], []
        return out
