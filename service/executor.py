"""The embedded executor: the engine runs in this process, on one dedicated worker thread.

The event loop only awaits; model loading, warm-up and every explanation run on the worker thread, so health
checks answer while a long request is explained. One thread because one RM instance is not meant to be driven
concurrently, and torch's own threads (`torch_threads`) do the parallel work.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

from tokencredit.types import DenseRewardsRequest, ShapingWeights
from workers.engine import Engine, EngineOutput

__all__ = ["EmbeddedExecutor", "NotReady", "Overloaded", "Unavailable"]

log = logging.getLogger("tokencredit.executor")


class NotReady(RuntimeError):
    """The model is still loading (503 with Retry-After)."""


class Overloaded(RuntimeError):
    """Too many requests are waiting (429 with Retry-After)."""


class Unavailable(RuntimeError):
    """A backing service (the Celery broker) is unreachable (503 with Retry-After)."""


class EmbeddedExecutor:
    def __init__(self, settings, on_model: Optional[Callable[[object], None]] = None):
        self.settings = settings
        # Called on the engine thread with the loaded RewardModel, before warm-up (the app scopes its shaping
        # state to the RM there).
        self.on_model = on_model
        self.engine: Optional[Engine] = None
        self.load_error: Optional[str] = None
        self.warmup_seconds: Optional[float] = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokencredit-engine")
        # Validation (tokenizing, alignment) on its own thread: bad input is answered at once, not after the
        # explanations queued before it. Only this thread uses the tokenizers once the model is loaded.
        self._prepare_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokencredit-prepare")
        self._pending = 0
        self._pending_items = 0

    @property
    def ready(self) -> bool:
        return self.engine is not None

    @property
    def pending(self) -> int:
        return self._pending

    @property
    def pending_items(self) -> int:
        """Items of the requests accepted and not yet answered (the `tokencredit_queue_depth` gauge)."""
        return self._pending_items

    def _load(self) -> None:
        from workers.evaluator import set_torch_threads
        from workers.model import RewardModel

        s = self.settings
        started = time.perf_counter()
        set_torch_threads(s.torch_threads)
        try:
            model = RewardModel.load(s.model, **s.model_kwargs())
            if s.shaping_weights().prefix > 0 and not model.reads_last_position:
                raise ValueError("TOKENCREDIT_WEIGHTS gives the prefix component a weight, but it needs a causal RM")
            if self.on_model is not None:
                self.on_model(model)
            engine = Engine(model, s.limits(), chunk_size=s.chunk_size)
            if s.warmup:
                self.warmup_seconds = engine.warmup()
        except Exception as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.exception("reward model failed to load from %s", s.model)
            raise
        self.engine = engine
        log.info(
            "reward model %s (%s, %s, %s) ready in %.1f s (warm-up %.1f s)",
            model.name, model.kind, model.device, model.dtype, time.perf_counter() - started, self.warmup_seconds or 0.0,
        )

    async def start(self) -> None:
        """Load the model on the worker thread; the server answers /healthz (and 503 on /readyz) meanwhile."""
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._pool, self._load)
        except Exception:
            pass  # reported by /readyz and by 503s on requests

    async def run(self, request: DenseRewardsRequest, weights: ShapingWeights) -> EngineOutput:
        if self.engine is None:
            raise NotReady(self.load_error or "the reward model is still loading")
        if self._pending >= self.settings.max_pending_requests:
            raise Overloaded(f"{self._pending} requests are already waiting for the engine")
        engine = self.engine
        loop = asyncio.get_running_loop()
        self._pending += 1
        self._pending_items += len(request.items)
        try:
            prepared = await loop.run_in_executor(self._prepare_pool, engine.prepare, request)
            return await loop.run_in_executor(self._pool, engine.run, request, weights, prepared)
        finally:
            self._pending -= 1
            self._pending_items -= len(request.items)

    def shutdown(self) -> None:
        self._prepare_pool.shutdown(wait=False, cancel_futures=True)
        self._pool.shutdown(wait=False, cancel_futures=True)
