"""The serving scheduler on its own, without a model: admission, the prefill budget and its
groups, chunk boundaries, expiry, the queue's bound."""

import pytest

from griffon.decode.sampling import SamplingParams
from griffon.engine.request import QueueFull, Request
from griffon.engine.scheduler import Scheduler

PLAIN = SamplingParams()
SCORED = SamplingParams(max_tokens=0, echo=True, logprobs=1)


def _req(name: str, n: int, params: SamplingParams = PLAIN, **kw) -> Request:
    return Request(name, list(range(n)), params, **kw)


def _names(requests) -> list[str]:
    return [r.id for r in requests]


def test_admission_is_first_come_first_served_within_the_batch():
    s = Scheduler(max_batch=2, max_queue=3, prefill_chunk=8, step_tokens=8)
    for name in "abc":
        s.enqueue(_req(name, 4))
    with pytest.raises(QueueFull):
        s.enqueue(_req("d", 4))
    assert _names(s.admit()) == ["a", "b"] and _names(s.waiting) == ["c"]
    s.enqueue(_req("d", 4))
    assert s.admit() == []  # no free slot
    s.start_running(s.prefilling[0])
    assert s.in_flight == 2 and _names(s.running) == ["a"]
    s.drop_rows([0])
    assert _names(s.admit()) == ["c"] and _names(s.waiting) == ["d"]


def test_the_prefill_budget_and_its_groups():
    """Chunks end at multiples of the chunk; at least one chunk per iteration whatever the budget;
    requests whose next chunks have the same length and kind share a group, in admission order."""
    s = Scheduler(max_batch=8, max_queue=8, prefill_chunk=8, step_tokens=20)
    a, b, c, d, e = _req("a", 20), _req("b", 5), _req("c", 20), _req("d", 20, SCORED), _req("e", 30)
    for r in (a, b, c, d, e):
        s.enqueue(r)
    s.admit()
    assert [s.next_chunk(r) for r in (a, b)] == [8, 5]
    a.prefilled = 5  # restored from a prefix: the next chunk ends at the next multiple of 8
    assert s.next_chunk(a) == 3
    a.prefilled = 16
    assert s.next_chunk(a) == 4  # the prompt's end
    a.prefilled = 0
    # budget 20: a (8), b (5), c (8) -> 21 tokens, the last chunk taken whole; d and e wait
    assert [_names(g) for g in s.prefill_groups()] == [["a", "c"], ["b"]]
    one = Scheduler(max_batch=8, max_queue=8, prefill_chunk=8, step_tokens=1)
    for r in (_req("x", 20), _req("y", 20)):
        one.enqueue(r)
    one.admit()
    assert [_names(g) for g in one.prefill_groups()] == [["x"]]  # at least one chunk
    mixed = Scheduler(max_batch=8, max_queue=8, prefill_chunk=8, step_tokens=64)
    for r in (_req("plain", 8), _req("scored", 8, SCORED)):
        mixed.enqueue(r)
    mixed.admit()
    assert [_names(g) for g in mixed.prefill_groups()] == [["plain"], ["scored"]]  # same length, two kinds


def test_expiry_takes_requests_out_of_every_queue():
    s = Scheduler(max_batch=2, max_queue=4, prefill_chunk=8, step_tokens=8)
    run_ok, run_late, pre_cancel, wait_late, wait_ok = (
        _req("run_ok", 3), _req("run_late", 3, deadline=5.0), _req("pre_cancel", 3), _req("wait_late", 3, deadline=1.0),
        _req("wait_ok", 3),
    )  # fmt: skip
    s.running = [run_ok, run_late]
    s.prefilling = [pre_cancel]
    pre_cancel.cancelled = True
    s.waiting.extend([wait_late, wait_ok])
    gone, rows = s.expire(now=10.0)
    assert sorted((r.id, why) for r, why in gone) == [
        ("pre_cancel", "cancelled"), ("run_late", "timeout"), ("wait_late", "timeout")
    ]  # fmt: skip
    assert rows == [1] and _names(s.running) == ["run_ok"] and not s.prefilling and _names(s.waiting) == ["wait_ok"]


def test_remove_and_take_all():
    s = Scheduler(max_batch=4, max_queue=4, prefill_chunk=8, step_tokens=8)
    a, b, c = _req("a", 3), _req("b", 3), _req("c", 3)
    s.running, s.prefilling = [a, b], [c]
    assert s.remove(b) == 1 and s.remove(c) is None and _names(s.running) == ["a"] and not s.prefilling
    s.enqueue(_req("d", 3))
    assert _names(s.take_all()) == ["d", "a"] and not s.has_work()


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="must be >= 1"):
        Scheduler(max_batch=0, max_queue=1, prefill_chunk=8, step_tokens=8)


def test_a_request_carries_no_engine_state():
    """The scheduler plans from a request's public fields (how far its prompt is prefilled, whether
    it was cancelled); what the engine computes with (caches, random streams) is the engine's."""
    import dataclasses

    fields = {f.name for f in dataclasses.fields(Request)}
    assert {"prefilled", "cancelled"} <= fields and not [n for n in fields if n.startswith("_")]
