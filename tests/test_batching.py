"""The micro-batcher and admission shared by both executors (service/batching.py), on the event loop with no model:
fairness between requests, batch bounds, slots, cancellation, and Retry-After from the drain rate."""

from __future__ import annotations

import asyncio

import pytest

from service.batching import Admission, DrainRate, Entry, MicroBatcher, wait_for_entries
from service.executor import Overloaded


def _entries(owner, n, rows=1):
    return [Entry(owner, rows, (owner, i), deadline=0.0) for i in range(n)]


def _run(coro):
    return asyncio.run(coro)


def test_a_large_request_is_not_starved_by_a_stream_of_small_ones():
    """One engine slot, batches of 4 rows; a 20-item request, then two new one-item requests after every batch,
    without end. Every batch carries some of the large request, which finishes; no small request waits more
    than two batches either. (First-come order would make the small ones wait for all of the large one; packing
    small items first would starve it.)"""

    async def scenario():
        batches, arrived = [], {}
        batcher = MicroBatcher(window_s=0.0, max_rows=4, flush=batches.append, slots=1)
        batcher.add(_entries("large", 20))
        small = 0
        while len(batches) < 30:
            for _ in range(2):
                arrived[f"small{small}"] = len(batches)
                batcher.add(_entries(f"small{small}", 1))
                small += 1
            batcher.release()  # the engine finished the batch
        return batches, arrived

    batches, arrived = _run(scenario())
    assert all(sum(e.rows for e in b) <= 4 for b in batches)
    large = [sum(e.owner == "large" for e in b) for b in batches]
    finished = max(i for i, k in enumerate(large) if k) + 1
    assert sum(large) == 20 and all(large[:finished]) and finished <= 20, large
    for i, b in enumerate(batches):
        for e in b:
            if e.owner != "large":
                assert i - arrived[e.owner] <= 2, (e.owner, arrived[e.owner], i)


def test_batches_take_one_item_per_request_per_turn_and_keep_request_order():
    async def scenario():
        batches = []
        batcher = MicroBatcher(window_s=0.0, max_rows=100, flush=batches.append)
        batcher.add(_entries("a", 3))
        batcher.add(_entries("b", 1))
        batcher.add(_entries("c", 2))
        await asyncio.sleep(0.01)
        return batches

    [batch] = _run(scenario())
    assert [e.payload for e in batch] == [("a", 0), ("b", 0), ("c", 0), ("a", 1), ("c", 1), ("a", 2)]


def test_full_batches_go_without_waiting_and_split_evenly():
    async def scenario():
        batches = []
        # A window no test would wait for: only the row bound can send these.
        batcher = MicroBatcher(window_s=3600, max_rows=40, flush=batches.append)
        for i in range(64):
            batcher.add(_entries(i, 1))
        return batches

    # 40 rows went at once when reached; the 24 left wait for the window (or the next full batch).
    assert [len(b) for b in _run(scenario())] == [40]

    async def all_at_once():
        batches = []
        batcher = MicroBatcher(window_s=3600, max_rows=40, flush=batches.append)
        batcher.add(_entries("one", 64))
        return batches

    assert [len(b) for b in _run(all_at_once())] == [32, 32]  # near-equal, not 40 + 24


def test_an_item_larger_than_a_batch_still_goes_alone():
    async def scenario():
        batches = []
        batcher = MicroBatcher(window_s=0.0, max_rows=10, flush=batches.append, slots=1)
        batcher.add(_entries("big", 2, rows=50))
        await asyncio.sleep(0.01)
        batcher.release()
        return batches

    assert [len(b) for b in _run(scenario())] == [1, 1]


def test_cancelled_entries_are_never_flushed():
    async def scenario():
        batches = []
        batcher = MicroBatcher(window_s=0.0, max_rows=100, flush=batches.append, slots=1)
        batcher.add(_entries("running", 1))
        await asyncio.sleep(0.01)  # goes to the (only) slot
        batcher.add(_entries("gone", 3))
        batcher.add(_entries("stays", 1))
        dropped = batcher.cancel("gone")
        assert batcher.queued_items == 1 and len(dropped) == 3
        batcher.release()
        return batches

    batches = _run(scenario())
    assert [[e.owner for e in b] for b in batches] == [["running"], ["stays"]]


def test_wait_for_entries_reports_a_client_that_went_away():
    async def scenario():
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in range(2)]
        gone = loop.create_future()
        loop.call_soon(gone.set_result, True)
        went = await wait_for_entries(futures, gone)
        for f in futures:
            f.set_result(None)
        answered = await wait_for_entries(futures, loop.create_future())
        return went, answered

    assert _run(scenario()) == (True, False)


class _Rate(DrainRate):
    def __init__(self, rate):
        super().__init__()
        self.rate = rate

    def per_second(self, now=None):
        return self.rate


def test_admission_marks_and_retry_after_from_the_drain_rate():
    admission = Admission(max_items=100, max_rows=1000, overloaded=Overloaded)
    admission.admit(500, 5000)  # an empty queue takes any one request, whatever its size
    with pytest.raises(Overloaded) as refused:
        admission.admit(1, 1)
    assert refused.value.retry_after == 1  # nothing answered yet: no rate to go by
    admission.leave(500, 5000)
    admission.admit(90, 100)
    admission.admit(10, 10)
    admission.drain = _Rate(4.0)  # 4 items/s
    with pytest.raises(Overloaded) as refused:
        admission.admit(20, 20)
    assert refused.value.retry_after == 5  # 20 items over the mark at 4 items/s
    admission.drain = _Rate(0.1)
    with pytest.raises(Overloaded) as refused:
        admission.admit(20, 20)
    assert refused.value.retry_after == 60  # capped
    admission.leave(100, 110)
    assert admission.items == 0 and admission.rows == 0


def test_drain_rate_counts_the_last_window_only():
    rate = DrainRate(window_s=10)
    assert rate.per_second(now=100.0) is None
    rate.note(50, now=100.0)
    rate.note(50, now=105.0)
    assert rate.per_second(now=110.0) == pytest.approx(10.0)  # 100 items over 10 s
    assert rate.per_second(now=112.0) == pytest.approx(50 / 7)  # the first 50 left the window
    assert rate.per_second(now=120.0) is None
