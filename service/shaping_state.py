"""The server's shaping weights: the current version of its deployment in the durable store (service.shaping_store).

The deployment is known only once the RM is loaded (its name and content revision are part of the key), so the
executor calls `bind_model` right after loading it (before warm-up); until then the shaping state, and with it the
admin API, answers 503 not_ready like the rest of the API.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional

from starlette.concurrency import run_in_threadpool

from service.executor import NotReady
from service.shaping_store import Deployment, ShapingStore
from tokencredit.types import ShapingInfo, ShapingVersion, ShapingWeights

__all__ = ["ShapingSnapshot", "ShapingState"]

log = logging.getLogger("tokencredit.shaping")


@dataclass(frozen=True)
class ShapingSnapshot:
    """One version's weights, as a request uses them (consistent even if a PUT lands meanwhile)."""

    weights: ShapingWeights
    version: Optional[int]
    deployment: Optional[str]

    def info(self) -> ShapingInfo:
        return ShapingInfo(version=self.version, weights=self.weights.as_dict(), deployment=self.deployment)


class ShapingState:
    def __init__(self, open_store: Callable[[Deployment], ShapingStore], deployment_name: Optional[str] = None):
        self._open_store = open_store
        self.deployment_name = deployment_name
        self.deployment: Optional[Deployment] = None
        self._store: Optional[ShapingStore] = None
        self._last: Optional[ShapingSnapshot] = None  # parsed weights of the last version read

    @classmethod
    def for_settings(cls, settings) -> "ShapingState":
        from service.shaping_store import make_store

        return cls(lambda deployment: make_store(settings, deployment), settings.deployment)

    def bind_model(self, model) -> None:
        """Scope the state to this RM (a loaded `RewardModel` or the broker mode's weightless validator) and open it."""
        self.deployment = Deployment.of(self.deployment_name, model)
        self._store = self._open_store(self.deployment)
        try:
            record = self._store.current()  # opens the store now: migration, seeding and their log lines at start-up
        except Exception as exc:  # e.g. Redis down: every later use retries, and answers 503 meanwhile
            log.warning("shaping state of deployment %s not opened yet (%s); retried on first use", self.deployment.key, exc)
            return
        log.info("shaping: deployment %s at version %d %s", self.deployment.key, record.version, record.weights)

    @property
    def store(self) -> ShapingStore:
        if self._store is None:
            raise NotReady("the reward model is not loaded (yet; see /readyz): shaping state is kept per deployment and RM")
        return self._store

    def snapshot(self, record: ShapingVersion) -> ShapingSnapshot:
        last = self._last
        if last is None or last.version != record.version:
            last = self._last = ShapingSnapshot(record.shaping_weights(), record.version, self.deployment.key)
        return last

    def request_weights(self, weights: ShapingWeights) -> ShapingSnapshot:
        """A request's own weights (no version), answered by this deployment."""
        return ShapingSnapshot(weights, None, self.deployment.key if self.deployment else None)

    async def current(self) -> ShapingSnapshot:
        """The current version: read from the store on every call (SQLite: a pragma, and a SELECT only after a
        commit; Redis: one GET), so a PUT through another server of the same deployment applies from the next request."""
        store = self.store
        return self.snapshot(await run_in_threadpool(store.current))

    async def pinned(self, version: int) -> Optional[ShapingSnapshot]:
        """A given version of this deployment, or None if it does not exist."""
        store = self.store
        record = await run_in_threadpool(store.get, version)
        return None if record is None else ShapingSnapshot(record.shaping_weights(), record.version, self.deployment.key)
