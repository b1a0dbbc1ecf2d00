"""The embedded executor: the engine runs in this process, on one dedicated worker thread.

The event loop only awaits; model loading, warm-up and every explanation run on the worker thread, so health
checks answer while a long request is explained. One thread because one RM instance is not meant to be driven
concurrently, and torch's own threads (`torch_threads`) do the parallel work.

Requests queue rather than being refused: each request's items go through `service.batching` (the same admission
and micro-batcher as the Celery path), which coalesces the items of concurrent requests into batches the engine
thread explains together (`workers.shared_rows.run_batch`: their score and attention rows share padded forward
passes). While one batch runs, the next one forms. A request whose client disconnects leaves the queue unexplained.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, List, Optional

from service.batching import Admission, Entry, MicroBatcher, client_gone, wait_for_entries
from tokencredit.types import DenseRewardsRequest, ItemError, ItemResult, ShapingWeights
from workers.engine import Engine, EngineOutput
from workers.registry import item_rows

__all__ = ["EmbeddedExecutor", "NotReady", "Overloaded", "Unavailable", "ClientGone"]

log = logging.getLogger("tokencredit.executor")


class NotReady(RuntimeError):
    """The model is still loading (503 with Retry-After)."""


class Overloaded(RuntimeError):
    """The queue is past its high mark (429; Retry-After: seconds the backlog needs to drain, as measured)."""

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


class ClientGone(RuntimeError):
    """The client disconnected while its request waited; its queued items were dropped (499, which nobody reads)."""


class Unavailable(RuntimeError):
    """A backing service (the Celery broker) is unreachable (503 with Retry-After)."""


def deadline_exceeded(deadline_ms: int) -> dict:
    """The item error of an item not explained within its request's deadline (both executors)."""
    return {"id": "", "error": {"code": "deadline_exceeded", "retryable": True,
                                "message": f"not explained within the request's deadline of {deadline_ms} ms"}}


class EmbeddedExecutor:
    # Batch sizes are observed here (per engine batch), not by the route (per request).
    observes_batches = True

    def __init__(self, settings, metrics=None, on_model: Optional[Callable[[object], None]] = None):
        self.settings = settings
        self.metrics = metrics
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
        self.admission = Admission(settings.max_queued_items, settings.max_queued_rows, Overloaded)
        # One slot: the engine thread runs one batch while the next one forms.
        self.batcher = MicroBatcher(settings.batch_window_ms / 1000.0, settings.batch_max_rows, self._flush, slots=1)
        if metrics is not None:
            metrics.scrape_hooks.append(lambda: metrics.observe_admission(self.admission))
        # The amortized credit head's state and its background trainer (issue 15), once the model is loaded.
        self.credit = None
        self.credit_trainer = None

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
        from workers.loader import load_engine

        s = self.settings
        started = time.perf_counter()
        try:
            engine = load_engine(s, on_model=self.on_model)
        except Exception as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.exception("reward model failed to load from %s", s.model)
            raise
        model, self.warmup_seconds = engine.model, engine.warmup_seconds
        if getattr(s, "credit_head", False):
            self._start_credit(engine)
        self.engine = engine
        log.info(
            "reward model %s (%s, %s, %s) ready in %.1f s (warm-up %.1f s)",
            model.name, model.kind, model.device, model.dtype, time.perf_counter() - started, self.warmup_seconds or 0.0,
        )

    def _start_credit(self, engine: Engine) -> None:
        """Attach the RM's credit head (the newest checkpoint of its revision, if any) and start its trainer."""
        from service.credit_trainer import CreditTrainer
        from workers.credit_serving import AmortizedCredit

        s, model = self.settings, engine.model
        credit = AmortizedCredit(
            model.name, model.revision, root=s.credit_dir, audit_fraction=s.credit_audit_fraction,
            min_spearman=s.credit_min_spearman, audit_window=s.credit_audit_window,
        )
        credit.load_latest()
        engine.credit = self.credit = credit
        # Training pauses whenever a request is waiting for or inside the engine.
        self.credit_trainer = CreditTrainer(credit, busy=lambda: self._pending > 0, train_every=s.credit_train_every).start()

    async def start(self) -> None:
        """Load the model on the worker thread; the server answers /healthz (and 503 on /readyz) meanwhile."""
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._pool, self._load)
        except Exception:
            pass  # reported by /readyz and by 503s on requests

    async def on_prepare_thread(self, fn, *args):
        """`fn(*args)` on the thread that validates requests: the one thread that tokenizes once the RM is loaded
        (the shims' truncation tokenizes too), so the RM's tokenizer is never driven from two threads at once."""
        return await asyncio.get_running_loop().run_in_executor(self._prepare_pool, fn, *args)

    async def run(self, request: DenseRewardsRequest, weights: ShapingWeights) -> EngineOutput:
        if self.engine is None:
            raise NotReady(self.load_error or "the reward model is still loading")
        engine = self.engine
        loop = asyncio.get_running_loop()
        n = len(request.items)
        # Refuse before tokenizing when the items alone are past the mark; rows are known after `prepare`.
        self.admission.admit(n, 0)
        held = (n, 0)  # what this request holds of the admission counts
        self._pending += 1
        self._pending_items += n
        try:
            prepared = await loop.run_in_executor(self._prepare_pool, engine.prepare, request)
            components = Engine.components_for(request, weights)
            rows = [item_rows(p.rm_input.n_tokens, request.methods, components) for p in prepared]
            self.admission.grow(sum(rows))
            held = (n, sum(rows))
            deadline_ms = request.deadline_ms or self.settings.default_deadline_ms
            deadline = time.time() + deadline_ms / 1000.0
            owner = object()
            entries = [Entry(owner, r, (request, weights, p), deadline, loop.create_future()) for p, r in zip(prepared, rows)]
            self.batcher.add(entries)
            try:
                gone = await wait_for_entries([e.done for e in entries], client_gone())
            except asyncio.CancelledError:
                self._drop(owner, "cancelled")
                raise
            if gone:
                dropped = self._drop(owner, "client_gone")
                raise ClientGone(f"the client went away; {dropped} of its {n} items were dropped unexplained")
            results: List[ItemResult] = []
            rm_rows = 0
            for e in entries:
                result, item_rows_used = e.done.result()
                results.append(result)
                rm_rows += item_rows_used
            return EngineOutput(results=results, rm_rows=rm_rows)
        finally:
            self._pending -= 1
            self._pending_items -= n
            self.admission.leave(*held)

    def _drop(self, owner: object, reason: str) -> int:
        dropped = self.batcher.cancel(owner)
        for e in dropped:
            e.done.cancel()
        if dropped and self.metrics is not None:
            self.metrics.dropped_items.labels(reason).inc(len(dropped))
        return len(dropped)

    # -------------------------------------------------------------------------------------------- batches
    def _flush(self, batch: List[Entry]) -> None:
        """Called by the batcher on the event loop: explain the batch on the engine thread, then answer it."""
        asyncio.get_running_loop().create_task(self._explain(batch))

    async def _explain(self, batch: List[Entry]) -> None:
        from workers.shared_rows import run_batch

        loop = asyncio.get_running_loop()
        try:
            now = time.time()
            live = []
            for e in batch:
                if e.done.done():
                    continue
                if now > e.deadline:
                    request = e.payload[0]
                    result = ItemResult.model_validate({**deadline_exceeded(request.deadline_ms or self.settings.default_deadline_ms), "id": e.payload[2].id})
                    e.done.set_result((result, 0))
                    if self.metrics is not None:
                        self.metrics.dropped_items.labels("deadline").inc()
                    continue
                live.append(e)
            if not live:
                return
            # One group per request: its items in this batch, in request order.
            groups: Dict[int, list] = {}
            for e in live:
                groups.setdefault(id(e.owner), []).append(e)
            jobs = [(g[0].payload[0], g[0].payload[1], [e.payload[2] for e in g]) for g in groups.values()]
            if self.metrics is not None:
                self.metrics.batch_items.observe(len(live))
            try:
                outputs = await loop.run_in_executor(self._pool, run_batch, self.engine, jobs)
            except Exception as exc:  # a bug, not an item's failure (those come back as item errors)
                log.exception("a batch of %d items failed", len(live))
                for e in live:
                    if not e.done.done():
                        error = ItemError(code="explain_failed", message=f"{type(exc).__name__}: {exc}", retryable=True)
                        e.done.set_result((ItemResult(id=e.payload[2].id, error=error), 0))
                return
            for g, output in zip(groups.values(), outputs):
                # The group's rows are reported once, with its first item.
                for k, (e, result) in enumerate(zip(g, output.results)):
                    if not e.done.done():
                        e.done.set_result((result, output.rm_rows if k == 0 else 0))
            self.admission.answered(len(live))
        finally:
            self.batcher.release()

    def shutdown(self) -> None:
        if self.credit_trainer is not None:
            self.credit_trainer.stop(timeout=0)
        self._prepare_pool.shutdown(wait=False, cancel_futures=True)
        self._pool.shutdown(wait=False, cancel_futures=True)
