"""Queueing and micro-batching, one implementation for both executors (embedded engine thread, Celery workers).

* `Admission` bounds what is queued (items and estimated RM rows: what a waiting request holds in memory and what
  it will cost) and answers past the high marks with `Overloaded`, whose `retry_after` comes from the measured
  drain rate: the seconds the backlog needs to make room for the request at the rate items have been answered.
* `MicroBatcher` coalesces the items of concurrent requests into batches of at most `max_rows` estimated rows
  (after `window_s`, or at once when that many rows wait) and hands each to `flush` while a slot is free: one slot
  for the embedded engine (the next batch forms while the current one runs), no limit for Celery (each batch is a
  task, and many can be in flight). Batches take items round-robin over requests, one item per request per turn,
  so a request's share does not depend on its size or its arrival order: a large request is never starved by a
  stream of small ones, and small ones do not wait behind all of a large one.
* `DisconnectWatch` notices a client that goes away while its request waits: `client_gone()` is a future for the
  current request, and the executors drop the request's queued items (they are never computed).
"""

from __future__ import annotations

import asyncio
import collections
import math
import time
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, List, Optional

__all__ = ["Admission", "Entry", "MicroBatcher", "DisconnectWatch", "client_gone", "wait_for_entries"]


@dataclass(eq=False)
class Entry:
    """One queued item: whose it is (`owner`: one per request), what it will cost, and the executor's payload."""

    owner: object
    rows: int
    payload: Any
    deadline: float
    done: asyncio.Future = field(default=None)


# ------------------------------------------------------------------------------------------------ admission
class DrainRate:
    """Items answered per second over the last `window_s` seconds of answers."""

    def __init__(self, window_s: float = 30.0):
        self.window_s = window_s
        self._events: Deque = collections.deque()  # (monotonic time, items)
        self._items = 0

    def note(self, items: int, now: Optional[float] = None) -> None:
        now = time.monotonic() if now is None else now
        self._events.append((now, items))
        self._items += items
        self._trim(now)

    def per_second(self, now: Optional[float] = None) -> Optional[float]:
        """None until something was answered in the window."""
        now = time.monotonic() if now is None else now
        self._trim(now)
        if not self._events:
            return None
        # At least a second: a burst answered in one instant is not an infinite rate.
        span = max(1.0, now - self._events[0][0])
        return self._items / span

    def _trim(self, now: float) -> None:
        while self._events and now - self._events[0][0] > self.window_s:
            self._items -= self._events.popleft()[1]


class Admission:
    """Counts the items (and their estimated rows) accepted and not yet answered; refuses past the high marks.

    A request is always admitted into an empty queue, whatever its size (the item limits bound it), so a single
    large request can never be refused forever.
    """

    def __init__(self, max_items: int, max_rows: int, overloaded: Callable[[str, int], Exception]):
        self.max_items = max_items
        self.max_rows = max_rows
        self._overloaded = overloaded
        self.items = 0
        self.rows = 0
        self.drain = DrainRate()

    def admit(self, items: int, rows: int) -> None:
        if self.items > 0 and (self.items + items > self.max_items or self.rows + rows > self.max_rows):
            raise self._overloaded(
                f"{self.items} items ({self.rows} estimated RM rows) are already queued; the limits are "
                f"{self.max_items} items and {self.max_rows} rows", self.retry_after(items, rows),
            )
        self.items += items
        self.rows += rows

    def grow(self, rows: int) -> None:
        """Add the estimated rows of items already admitted (known once they are tokenized); refused past the rows
        mark unless nothing else holds rows."""
        if self.rows > 0 and self.rows + rows > self.max_rows:
            raise self._overloaded(
                f"{self.rows} estimated RM rows are already queued (limit {self.max_rows})", self.retry_after(0, rows))
        self.rows += rows

    def leave(self, items: int, rows: int) -> None:
        self.items -= items
        self.rows -= rows

    def answered(self, items: int) -> None:
        self.drain.note(items)

    def retry_after(self, items: int = 1, rows: int = 0) -> int:
        """Whole seconds until the backlog, draining at the measured rate, leaves room for `items` (1 to 60; 1 when
        nothing has been answered yet to measure)."""
        rate = self.drain.per_second()
        if not rate:
            return 1
        excess = max(self.items + items - self.max_items, 1)
        if self.max_rows and self.rows + rows > self.max_rows and self.rows:
            # Rows over their mark: the same backlog measured in rows, drained at items/s × rows per item.
            excess = max(excess, math.ceil((self.rows + rows - self.max_rows) * self.items / self.rows))
        return int(min(60, max(1, math.ceil(excess / rate))))


# ------------------------------------------------------------------------------------------------ batching
class MicroBatcher:
    """Coalesces entries into batches (≤ `max_rows` estimated rows, ≥ 1 entry) for `flush(batch)`.

    Args:
        window_s: how long the first waiting entry waits for company before its batch goes.
        max_rows: rows per batch; more waiting rows than this go at once, as several near-equal batches.
        flush: called on the event loop with each batch. With `slots`, the caller calls `release()` once the
            batch is done (answered or failed), which lets the next batch go.
        slots: batches in flight at once (None: no limit).
    """

    def __init__(self, window_s: float, max_rows: int, flush: Callable[[List[Entry]], None], slots: Optional[int] = None):
        self.window_s = window_s
        self.max_rows = max(1, int(max_rows))
        self.flush = flush
        self.slots = slots
        self._queues: "collections.OrderedDict[object, Deque[Entry]]" = collections.OrderedDict()
        self.queued_items = 0
        self.queued_rows = 0
        self._timer: Optional[asyncio.TimerHandle] = None
        self._window_over = False

    def add(self, entries: List[Entry]) -> None:
        """Queue one request's entries (all of one owner)."""
        for e in entries:
            self._queues.setdefault(e.owner, collections.deque()).append(e)
            self.queued_items += 1
            self.queued_rows += e.rows
        if self.queued_rows >= self.max_rows:
            self._window_over = True  # a full batch does not wait for the window
        if self._window_over:
            self._drain()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.window_s, self._window_ends)

    def cancel(self, owner: object) -> List[Entry]:
        """Remove the owner's entries that are still queued (they will never be flushed); returns them."""
        queue = self._queues.pop(owner, None)
        if not queue:
            return []
        for e in queue:
            self.queued_items -= 1
            self.queued_rows -= e.rows
        if not self.queued_items:
            self._quiet()
        return list(queue)

    def release(self) -> None:
        """A flushed batch is done: its slot is free again. Entries that waited meanwhile go at once."""
        if self.slots is not None:
            self.slots += 1
        if self.queued_items:
            self._window_over = True
            self._drain()

    def _window_ends(self) -> None:
        self._timer = None
        self._window_over = True
        self._drain()

    def _drain(self) -> None:
        while self.queued_items and self._window_over and (self.slots is None or self.slots > 0):
            # Without a slot limit (Celery), k near-equal batches rather than full ones plus a remainder: 64 items
            # over two workers go 32 + 32, not 40 + 24. With slots, full batches: the rest waits for a slot anyway.
            target = self.max_rows if self.slots is not None else self.queued_rows / math.ceil(self.queued_rows / self.max_rows)
            batch = self._take(target)
            if self.slots is not None:
                self.slots -= 1
            self.flush(batch)
        if not self.queued_items:
            self._quiet()

    def _quiet(self) -> None:
        # Nothing waits: the next entry opens a new window.
        self._window_over = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _take(self, target: float) -> List[Entry]:
        """One batch of about `target` rows, one entry per request per turn."""
        batch: List[Entry] = []
        rows = 0
        while self._queues:
            owner, queue = next(iter(self._queues.items()))
            e = queue[0]
            if batch and rows + e.rows > target * 1.0001:
                break  # this request goes first in the next batch
            queue.popleft()
            batch.append(e)
            rows += e.rows
            self.queued_items -= 1
            self.queued_rows -= e.rows
            if queue:
                self._queues.move_to_end(owner)
            else:
                del self._queues[owner]
        return batch


async def wait_for_entries(futures: List[asyncio.Future], gone: Optional[asyncio.Future], timeout: Optional[float] = None) -> bool:
    """Wait until every future is done, the client is gone, or `timeout` seconds pass. True: the client went away
    first."""
    if not futures:
        return False
    loop = asyncio.get_running_loop()
    all_done = loop.create_future()
    left = len(futures)

    def one_done(_):
        nonlocal left
        left -= 1
        if left == 0 and not all_done.done():
            all_done.set_result(None)

    for f in futures:
        f.add_done_callback(one_done)
    waits = {all_done} if gone is None else {all_done, gone}
    try:
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not all_done.done():
            all_done.cancel()
    return gone is not None and gone.done() and left > 0


# ------------------------------------------------------------------------------------------------ disconnects
_CLIENT_GONE: ContextVar[Optional[asyncio.Future]] = ContextVar("tokencredit_client_gone", default=None)


def client_gone() -> Optional[asyncio.Future]:
    """A future that completes when the current HTTP request's client disconnects (None outside a request)."""
    return _CLIENT_GONE.get()


class DisconnectWatch:
    """ASGI middleware: once the request body is read, listen for the client's disconnect and complete the
    request's `client_gone()` future. Routes do not read the connection again after the body, so the listening
    is done here, for them; an app that does call `receive` afterwards gets the same disconnect message."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        gone = asyncio.get_running_loop().create_future()
        token = _CLIENT_GONE.set(gone)
        listener: Optional[asyncio.Task] = None

        async def listen():
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    if not gone.done():
                        gone.set_result(True)
                    return message

        async def watched_receive():
            nonlocal listener
            if listener is not None:
                return await asyncio.shield(listener)
            message = await receive()
            if message["type"] == "http.disconnect" and not gone.done():
                gone.set_result(True)
            elif message["type"] == "http.request" and not message.get("more_body", False):
                listener = asyncio.ensure_future(listen())
            return message

        try:
            await self.app(scope, watched_receive, send)
        finally:
            _CLIENT_GONE.reset(token)
            if listener is not None and not listener.done():
                listener.cancel()
