"""The Celery executor: same interface as `EmbeddedExecutor` (`ready`, `start`, `run`, `shutdown`), engine on workers.

Validation stays here, before dispatch: the API loads the RM's config and tokenizer only (no weights, see
`load_validator`) and runs the real `Engine.prepare` on them, so a 413/422 never reaches a worker and the API
needs no RM memory. Then, per request:

1. cache lookup (MGET) of every item; hits are answered at once with `rm_rows` 0;
2. misses are admitted (`service.batching.Admission`: 429 past the queue's high marks) and go to the
   `MicroBatcher` (the embedded executor's too), which coalesces items of concurrent requests for
   `batch_window_ms` or until `batch_max_rows` estimated RM rows, and publishes one task per batch;
3. workers write each item under its id and push the task id to this process's reply list; one listener
   (BLPOP) wakes the waiting requests, which read their items (MGET) and are answered;
4. what is not answered by the deadline gets an explicit `deadline_exceeded` item error; a request whose client
   disconnects leaves the queue (items not yet published are never sent).

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
from dataclasses import dataclass
from typing import Dict, List, Optional

from service.batching import Admission, Entry, MicroBatcher, client_gone, wait_for_entries
from service.cache import item_cache_key, request_shared_part
from service.executor import ClientGone, NotReady, Overloaded, Unavailable, deadline_exceeded
from tokencredit.types import Component, DenseRewardsRequest, ItemResult, ShapingWeights
from workers.celery_app import TASK_NAME, TaskPayload, keys, make_celery
from workers.engine import Engine, EngineOutput
from workers.registry import item_rows

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
    """RM rows an item will cost (before de-duplication): the micro-batcher's unit of work (workers/registry.py)."""
    return item_rows(n_tokens, request.methods, components)


@dataclass
class _TaskItem:
    """What an `Entry` carries to a task: its request's shared part (once per task) and the item itself."""

    group: int  # id of the request's shared part, so one task carries it once
    shared: dict  # {"request": ..., "weights": ...}
    uid: str
    cache_key: Optional[str]
    item: dict


class CeleryExecutor:
    # Batch sizes are observed here (per task), not by the route (per request).
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
        self._waiting: Dict[str, List[Entry]] = {}  # task id → entries waiting for it
        self.admission = Admission(settings.max_queued_items, settings.max_queued_rows, Overloaded)
        # No slot limit: every batch is a task, and workers take them as they can.
        self._batcher = MicroBatcher(settings.batch_window_ms / 1000.0, settings.batch_max_rows, self._publish)
        if metrics is not None:
            metrics.scrape_hooks.append(self._scrape)
            metrics.scrape_hooks.append(lambda: metrics.observe_admission(self.admission))

    # -------------------------------------------------------------------------------------------- lifecycle
    @property
    def ready(self) -> bool:
        return self.engine is not None

    @property
    def pending(self) -> int:
        return self.admission.items

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
    async def on_prepare_thread(self, fn, *args):
        """`fn(*args)` on the thread that validates requests: the one thread that tokenizes once the RM is loaded
        (the shims' truncation tokenizes too), so the RM's tokenizer is never driven from two threads at once."""
        return await asyncio.get_running_loop().run_in_executor(self._prepare_pool, fn, *args)

    async def run(self, request: DenseRewardsRequest, weights: ShapingWeights) -> EngineOutput:
        if self.engine is None:
            raise NotReady(self.load_error or "the request validator is still loading")
        deadline_ms = request.deadline_ms or self.settings.default_deadline_ms
        deadline = time.time() + deadline_ms / 1000.0
        n = len(request.items)
        # Refused before any work when the items alone are past the high mark (rows are known after `prepare`).
        self.admission.admit(n, 0)
        held = [n, 0]  # what this request holds of the admission counts: its items waiting for workers, their rows
        try:
            return await self._run(request, weights, deadline_ms, deadline, held)
        finally:
            self.admission.leave(*held)
            self._set_depth()

    async def _run(self, request, weights, deadline_ms: int, deadline: float, held: list) -> EngineOutput:
        loop = asyncio.get_running_loop()
        n = len(request.items)
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
        entries: List[Optional[Entry]] = []
        for i, (p, hit) in enumerate(zip(prepared, hits)):
            if hit is not None:
                entries.append(None)
                continue
            rows = estimate_rows(p.rm_input.n_tokens, request, components)
            item = request.items[i].model_dump(mode="json", exclude={"id"})
            task_item = _TaskItem(id(shared), shared, f"{request_uid}:{i}", cache_keys[i], item)
            entries.append(Entry(request_uid, rows, task_item, deadline, loop.create_future()))
        todo = [e for e in entries if e is not None]
        # Cache hits wait for nothing: only the items sent to workers stay counted, with their rows.
        self.admission.leave(n - len(todo), 0)
        held[0] = len(todo)
        self.admission.grow(sum(e.rows for e in todo))
        held[1] = sum(e.rows for e in todo)
        self._set_depth()
        try:
            if todo:
                self._batcher.add(todo)
                remaining = max(0.0, deadline - time.time())
                if await wait_for_entries([e.done for e in todo], client_gone(), timeout=remaining):
                    dropped = self._drop(request_uid, todo, "client_gone")
                    raise ClientGone(f"the client went away; {dropped} of its {n} items were dropped before they were sent")
        except asyncio.CancelledError:
            self._drop(request_uid, todo, "cancelled")
            raise
        finally:
            self.admission.answered(sum(1 for e in todo if e.done.done() and not e.done.cancelled()))
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
                payload = {"result": deadline_exceeded(deadline_ms)}
                rows = 0
                if self.metrics is not None:
                    self.metrics.worker_failures.labels("deadline").inc()
            result = ItemResult.model_validate({**payload["result"], "id": p.id})
            if result.error is not None and self.metrics is not None and from_worker:
                self.metrics.worker_failures.labels(result.error.code).inc()
            results.append(result)
            rm_rows += rows
        return EngineOutput(results=results, rm_rows=rm_rows)

    def _drop(self, owner: str, todo: List[Entry], reason: str) -> int:
        """Take the request's unpublished items out of the queue; the published ones' answers will be ignored."""
        dropped = self._batcher.cancel(owner)
        for e in todo:  # let the listener forget these items
            e.done.cancel()
        if dropped and self.metrics is not None:
            self.metrics.dropped_items.labels(reason).inc(len(dropped))
        return len(dropped)

    async def _redis_call(self, fn, *args):
        import redis

        try:
            return await fn(*args)
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
            raise BrokerUnavailable(f"Redis is unreachable: {exc}") from None

    # -------------------------------------------------------------------------------------------- batches
    def _publish(self, batch: List[Entry]) -> None:
        """Called by the batcher on the event loop: build one task, publish it off-loop."""
        task_id = uuid.uuid4().hex
        groups: Dict[int, dict] = {}
        for e in batch:
            t = e.payload
            g = groups.setdefault(t.group, {**t.shared, "items": []})
            g["items"].append({"uid": t.uid, "cache_key": t.cache_key, "item": t.item, "deadline": e.deadline})
        deadline = max(e.deadline for e in batch)
        payload = TaskPayload(
            reply_to=self.reply_key, prefix=self.prefix, revision=self.engine.model.revision,
            deadline=deadline, cache_ttl=self.settings.cache_ttl_s, groups=list(groups.values()),
        ).model_dump(mode="json")
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
    def _fail(entries: List[Entry], exc: Exception) -> None:
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
                blobs = await self._redis.mget([keys.item(self.prefix, e.payload.uid) for e in batch])
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
            self.metrics.queue_depth.set(self.admission.items)

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
