"""The server's current shaping weights and their version (the admin API will update them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from starlette.concurrency import run_in_threadpool

from service.shaping_store import ShapingRecord, ShapingStore
from tokencredit.types import ShapingInfo, ShapingWeights

__all__ = ["ShapingState"]


@dataclass
class ShapingState:
    weights: ShapingWeights
    version: int = 1
    # Durable versions (service.shaping_store); None = fixed weights (tests, schema rendering).
    store: Optional[ShapingStore] = None

    def info(self) -> ShapingInfo:
        return ShapingInfo(version=self.version, weights=self.weights.as_dict())

    def _adopt(self, record: ShapingRecord) -> "ShapingState":
        if record.version != self.version:
            self.weights, self.version = record.shaping_weights(), record.version
        return ShapingState(weights=self.weights, version=self.version)  # a consistent snapshot

    async def current(self) -> "ShapingState":
        """The current version (SQLite: cached in memory; Redis: one GET of the current version number)."""
        if self.store is None:
            return ShapingState(weights=self.weights, version=self.version)
        # A remote store does I/O (off the event loop); the SQLite store answers from memory.
        record = await run_in_threadpool(self.store.current) if self.store.remote else self.store.current()
        return self._adopt(record)

    async def pinned(self, version: int) -> Optional["ShapingState"]:
        """A given version, or None if it does not exist."""
        if self.store is None:
            return self if version == self.version else None
        record = await run_in_threadpool(self.store.get, version)
        return None if record is None else ShapingState(weights=record.shaping_weights(), version=record.version)
