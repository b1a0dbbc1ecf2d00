"""The Celery executor: same interface as `EmbeddedExecutor` (`ready`, `start`, `run`, `shutdown`), engine on workers.

Validation stays here, before dispatch: the API loads the RM's config and tokenizer only (no weights, see
`load_validator`) and runs the real `Engine.prepare` on them, so a 413/422 never reaches a worker and the API
needs no RM memory. Then, per request:

1. cache lookup (MGET) of every item; hits are answered at once with `rm_rows` 0;
2. misses go to the `MicroBatcher`, which coalesces items of concurrent requests for `batch_window_ms` or until
   `batch_max_rows` estimated RM rows, and publishes one task per batch;
3. workers write each item under its id and push the task id to this process's reply list; one listener
   (BLPOP) wakes the waiting requests, which read their items (MGET) and are answered;
4. what is not answered by the deadline gets an explicit `deadline_exceeded` item error.

Redis down → `BrokerUnavailable` (503 + Retry-After) on new requests and on the ones waiting; nothing hangs,
and the next request after Redis is back simply works (redis-py and kombu reconnect on use).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from service.cache import item_cache_key, request_shared_part
from service.executor import NotReady, Overloaded, Unavailable
from tokencredit.types import Component, DenseRewardsRequest, ItemResult, ShapingWeights
from workers.celery_app import TASK_NAME, keys, make_celery
from workers.engine import Engine, EngineOutput
from workers.explainers import default_lime_samples, default_shap_rows

__all__ = ["CeleryExecutor", "BrokerUnavailable", "MicroBatcher", "load_validator", "estimate_rows"]

log = logging.getLogger("tokencredit.dispatch")


class BrokerUnavailable(Unavailable):
    """Redis cannot be reached (503 with Retry-After)."""


def load_validator(settings):
    """A `RewardModel` with the RM's tokenizer and layout but no weights: enough for `Engine.prepare`."""
    from workers.model import RewardModel

    # Device/dtype are the workers' (reported back with results); until then, what a worker here would pick.
    return RewardModel.load(settings.model, **settings.model_kwargs(), load_weights=False)


def estimate_rows(n_tokens: int, request: DenseRewardsRequest, components: List[Component]) -> int:
    """RM rows an item will cost (before de-duplication): the micro-batcher's unit of work."""
    m = request.methods
    rows = 1
    for c in components:
        if c is Component.attention:
            rows += 1
        elif c is Component.loo:
            rows += n_tokens + 1
        elif c is Component.shap:
            rows += m.shap.max_rows if m and m.shap and m.shap.max_rows else default_shap_rows(n_tokens)
        elif c is Component.lime:
            rows += m.lime.num_samples if m and m.lime and m.lime.num_samples else default_lime_samples(n_tokens)
    return rows


@dataclass
class _Entry:
    group: int  # id of the request's shared part, so one task carries it once
    shared: dict  # {"request": ..., "weights": ...}
    uid: str
    cache_key: Optional[str]
    item: dict
    rows: int
    deadline: float
    done: asyncio.Future = field(default=None)


class MicroBatcher:
    """Coalesces entries for `window_s` or until `max_rows`, then hands each batch (≤ max_rows, ≥ 1 entry) to `flush`."""

    def __init__(self, window_s: float, max_rows: int, flush):
        self.window_s = window_s
        self.max_rows = max_rows
        self.flush = flush
        self._pending: List[_Entry] = []
        self._rows = 0
        self._timer: Optional[asyncio.TimerHandle] = None

    def add(self, entries: List[_Entry]) -> None:
        self._pending.extend(entries)
        self._rows += sum(e.rows for e in entries)
        if self._rows >= self.max_rows:
            self._drain()  # a full batch does not wait for the window
        elif self._pending and self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.window_s, self._drain)

    def _drain(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, total, self._pending, self._rows = self._pending, self._rows, [], 0
        if not batch:
            return
        # k near-equal batches rather than full ones plus a remainder: 64 items over two workers go 32 + 32,
        # not 40 + 24.
        k = -(-total // self.max_rows)
        target = total / k
        current, rows = [], 0
        for e in batch:
            if current and k > 1 and rows + e.rows > target * 1.0001:
                self.flush(current)
                current, rows, k = [], 0, k - 1
            current.append(e)
            rows += e.rows
        self.flush(current)


class CeleryExecutor:
    # The route records batch sizes for executors that do not (the embedded one runs each request as a batch).
    observes_batches = True

    def __init__(self, settings, metrics=None, on_model=None):
        self.settings = settings
        # Called with the weightless validator once loaded (it has the RM's name and revision, which scope the
        # shaping state).
        self.on_model = on_model
        # How rows are computed; part of every cache key (see service.cache.request_shared_part). `last_layer`
        # marks rows that run the last layer at the score position only (same arithmetic, other bf16 rounding),
        # so answers cached before it are not served as if computed by it.
        # `causal_masking` and `chat_template` change a causal RM's value function and layout, so they are keyed too.
        self._numerics = (f"rows={settings.explain_dtype},compile={settings.compile_rows},last_layer=score_position,"
                          f"causal_masking={settings.causal_masking},chat_template={settings.chat_template}")
        self.metrics = metrics
        self.engine: Optional[Engine] = None  # the validator: real Engine.prepare on a weightless RewardModel
        self.load_error: Optional[str] = None
        self.api_id = uuid.uuid4().hex
        self.prefix = settings.key_prefix
        self.reply_key = keys.reply(self.prefix, self.api_id)
        self.celery = make_celery(settings)
        self._prepare_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokencredit-prepare")
        # Publishing is blocking kombu I/O: off the event loop, two at a time so one slow publish does not stall.
        self._publish_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tokencredit-publish")
        self._redis = None
        self._listener: Optional[asyncio.Task] = None
        self._waiting: Dict[str, List[_Entry]] = {}  # task id → entries waiting for it
        self._queued = 0
        self._batcher = MicroBatcher(settings.batch_window_ms / 1000.0, settings.batch_max_rows, self._publish)
        if metrics is not None:
            metrics.scrape_hooks.append(self._scrape)

    # -------------------------------------------------------------------------------------------- lifecycle
    @property
    def ready(self) -> bool:
        return self.engine is not None

    @property
    def pending(self) -> int:
        return self._queued

    def _load(self) -> None:
        model = load_validator(self.settings)
        if self.on_model is not None:
            self.on_model(model)
        self.engine = Engine(model, self.settings.limits(), chunk_size=self.settings.chunk_size)
        log.info("validator for %s (revision %s) ready; work goes to queue %r", model.name, model.revision, self.settings.queue)

    async def start(self) -> None:
        import redis.asyncio as aioredis

        self._redis = aioredis.Redis.from_url(self.settings.broker_url, socket_timeout=5, socket_connect_timeout=2)
        self._listener = asyncio.create_task(self._listen())
        try:
            await asyncio.get_running_loop().run_in_executor(self._prepare_pool, self._load)
        except Exception as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.exception("validator failed to load from %s", self.settings.model)

    def shutdown(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
        self._prepare_pool.shutdown(wait=False, cancel_futures=True)
        self._publish_pool.shutdown(wait=False, cancel_futures=True)

    # -------------------------------------------------------------------------------------------- requests
    async def run(self, request: DenseRewardsRequest, weights: ShapingWeights) -> EngineOutput:
        if self.engine is None:
            raise NotReady(self.load_error or "the request validator is still loading")
        loop = asyncio.get_running_loop()
        deadline_ms = request.deadline_ms or self.settings.default_deadline_ms
        deadline = time.time() + deadline_ms / 1000.0
        n = len(request.items)
        if self._queued > 0 and self._queued + n > self.settings.max_queued_items:
            raise Overloaded(f"{self._queued} items are already waiting for workers (limit {self.settings.max_queued_items})")
        prepared = await loop.run_in_executor(self._prepare_pool, self.engine.prepare, request)
        components = Engine.components_for(request, weights)
        shared_key = request_shared_part(request, weights, [c.value for c in components], self.engine.model.revision,
                                         self._numerics)
        cache_keys = [item_cache_key(shared_key, it) if self.settings.cache_ttl_s > 0 else None for it in request.items]
        cached = await self._redis_call(self._redis.mget, [keys.cache(self.prefix, k) for k in cache_keys if k]) if any(cache_keys) else []
        cached_iter = iter(cached)
        hits = [next(cached_iter) if k else None for k in cache_keys]
        if self.metrics is not None:
            self.metrics.cache_hits.inc(sum(h is not None for h in hits))
            self.metrics.cache_misses.inc(sum(h is None for h in hits))

        shared = {
            "request": request.model_dump(mode="json", exclude={"items", "weights", "deadline_ms"}),
            "weights": weights.as_dict(),
        }
        request_uid = uuid.uuid4().hex
        entries: List[Optional[_Entry]] = []
        for i, (p, hit) in enumerate(zip(prepared, hits)):
            if hit is not None:
                entries.append(None)
                continue
            rows = estimate_rows(p.rm_input.n_tokens, request, components)
            item = request.items[i].model_dump(mode="json", exclude={"id"})
            entries.append(_Entry(id(shared), shared, f"{request_uid}:{i}", cache_keys[i], item, rows, deadline, loop.create_future()))
        todo = [e for e in entries if e is not None]
        self._queued += len(todo)
        self._set_depth()
        try:
            if todo:
                self._batcher.add(todo)
                remaining = max(0.0, deadline - time.time())
                await asyncio.wait([e.done for e in todo], timeout=remaining)
        except asyncio.CancelledError:
            for e in todo:  # the caller went away: let the listener forget these items
                e.done.cancel()
            raise
        finally:
            self._queued -= len(todo)
            self._set_depth()
        for e in todo:
            if e.done.done() and isinstance(e.done.exception(), BrokerUnavailable):
                raise e.done.exception()

        results, rm_rows = [], 0
        for i, (p, hit, e) in enumerate(zip(prepared, hits, entries)):
            from_worker = hit is None and e.done.done()
            if hit is not None:
                payload = json.loads(hit)
                rows = 0
            elif from_worker:
                payload = e.done.result()
                rows = int(payload.get("rm_rows", 0))
            else:
                e.done.cancel()
                payload = {"result": {"id": "", "error": {"code": "deadline_exceeded", "retryable": True,
                           "message": f"not explained within the request's deadline of {deadline_ms} ms"}}}
                rows = 0
                if self.metrics is not None:
                    self.metrics.worker_failures.labels("deadline").inc()
            result = ItemResult.model_validate({**payload["result"], "id": p.id})
            if result.error is not None and self.metrics is not None and from_worker:
                self.metrics.worker_failures.labels(result.error.code).inc()
            results.append(result)
            rm_rows += rows
        return EngineOutput(results=results, rm_rows=rm_rows)

    async def _redis_call(self, fn, *args):
        import redis

        try:
            return await fn(*args)
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
            raise BrokerUnavailable(f"Redis is unreachable: {exc}") from None

    # -------------------------------------------------------------------------------------------- batches
    def _publish(self, batch: List[_Entry]) -> None:
        """Called by the batcher on the event loop: build one task, publish it off-loop."""
        task_id = uuid.uuid4().hex
        groups: Dict[int, dict] = {}
        for e in batch:
            g = groups.setdefault(e.group, {**e.shared, "items": []})
            g["items"].append({"uid": e.uid, "cache_key": e.cache_key, "item": e.item, "deadline": e.deadline})
        deadline = max(e.deadline for e in batch)
        payload = {
            "reply_to": self.reply_key, "prefix": self.prefix, "revision": self.engine.model.revision,
            "deadline": deadline, "cache_ttl": self.settings.cache_ttl_s, "groups": list(groups.values()),
        }
        self._waiting[task_id] = batch
        if self.metrics is not None:
            self.metrics.batch_items.observe(len(batch))
        future = asyncio.get_running_loop().run_in_executor(self._publish_pool, self._send, task_id, payload, deadline)
        future.add_done_callback(lambda f: self._published(task_id, f))

    def _send(self, task_id: str, payload: dict, deadline: float) -> None:
        from datetime import datetime, timezone

        # expires: a worker that picks the task up after the deadline drops it instead of running it.
        self.celery.send_task(TASK_NAME, args=[payload], task_id=task_id, queue=self.settings.queue,
                              expires=datetime.fromtimestamp(deadline, tz=timezone.utc), retry=True)

    def _published(self, task_id: str, future) -> None:
        exc = future.exception()
        if exc is not None:
            log.warning("publishing task %s failed: %s", task_id, exc)
            self._fail(self._waiting.pop(task_id, []), BrokerUnavailable(f"cannot publish to the broker: {exc}"))

    @staticmethod
    def _fail(entries: List[_Entry], exc: Exception) -> None:
        for e in entries:
            if not e.done.done():
                e.done.set_exception(exc)
                e.done.exception()  # mark retrieved: waiters past their deadline may never look

    async def _listen(self) -> None:
        """One BLPOP loop per API process; on a Redis error, fail the waiting requests (503) and keep retrying."""
        import redis

        while True:
            try:
                popped = await self._redis.blpop([self.reply_key], timeout=1)
                if popped is None:
                    self._forget_abandoned()
                    continue
                task_id = popped[1].decode()
                batch = self._waiting.pop(task_id, None)
                if batch is None:
                    continue  # a redelivered task's second notice, or a request that gave up
                blobs = await self._redis.mget([keys.item(self.prefix, e.uid) for e in batch])
                for e, blob in zip(batch, blobs):
                    if e.done.done():
                        continue
                    if blob is None:
                        e.done.set_result({"result": {"id": "", "error": {"code": "result_lost", "retryable": True,
                                           "message": "the worker finished but the item's result expired"}}})
                    else:
                        out = json.loads(blob)
                        self._note_worker(out)
                        e.done.set_result(out)
            except asyncio.CancelledError:
                raise
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
                waiting, self._waiting = self._waiting, {}
                for batch in waiting.values():
                    self._fail(batch, BrokerUnavailable(f"lost the connection to Redis: {exc}"))
                if waiting and self.metrics is not None:
                    self.metrics.worker_failures.labels("broker_lost").inc(len(waiting))
                await asyncio.sleep(0.5)
            except Exception:
                log.exception("reply listener error")
                await asyncio.sleep(0.5)

    def _forget_abandoned(self) -> None:
        # Tasks whose every request gave up (deadline passed; the expired task is dropped by the worker) would
        # otherwise stay here forever.
        for task_id in [t for t, batch in self._waiting.items() if all(e.done.done() for e in batch)]:
            del self._waiting[task_id]

    def _note_worker(self, out: dict) -> None:
        # Report the device/dtype the workers actually run on in `model` (the validator has no weights).
        model = self.engine.model if self.engine else None
        if model is not None and out.get("device"):
            model.device, model.dtype = out["device"], out.get("dtype", model.dtype)

    # -------------------------------------------------------------------------------------------- metrics
    def _set_depth(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(self._queued)

    def _scrape(self) -> None:
        import redis

        r = redis.Redis.from_url(self.settings.broker_url, socket_timeout=1, socket_connect_timeout=1)
        try:
            self.metrics.broker_queue.set(r.llen(self.settings.queue))
            self.metrics.redeliveries.set(int(r.get(keys.stat(self.prefix, "redeliveries")) or 0))
        except redis.exceptions.RedisError:
            self.metrics.broker_queue.set(-1)
        finally:
            r.close()
