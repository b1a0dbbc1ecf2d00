"""The worker side: one task explains a micro-batch of items and writes each result under its item id.

The task's argument is a `TaskPayload` (`workers/celery_app.py`, built by `service/dispatch.py`), validated here
before anything runs. Each item is explained as its own one-item request: the engine seeds every item's explainers
and evaluates each item's rows on their own, so the numbers are bit-identical to the embedded path whatever the
batch holds. A redelivered task skips the items another delivery already wrote (SET NX), so an item is answered
exactly once.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time

from workers.celery_app import TASK_NAME, TaskGroup, TaskItem, TaskPayload, keys

__all__ = ["register", "explain_batch", "process_engine"]

log = logging.getLogger("tokencredit.worker")

_settings = None
_engine = None
_redis = None
_lock = threading.Lock()


def process_engine():
    """The process's engine, loaded on first use (after fork/start, never in a parent process)."""
    global _engine
    with _lock:
        if _engine is None:
            # The embedded path's loader (dtype, explain dtype, torch threads, warm-up): the two paths must give
            # bit-identical numbers, and one loader cannot drift from another.
            from workers.loader import load_engine

            started = time.perf_counter()
            try:
                _engine = load_engine(_settings)
            except Exception:
                log.exception("reward model failed to load from %s", _settings.model)
                raise
            m = _engine.model
            log.info("worker %d: %s (%s, %s) ready in %.1f s", os.getpid(), m.name, m.device, m.dtype,
                     time.perf_counter() - started)
    return _engine


def _client():
    global _redis
    if _redis is None:
        import redis

        _redis = redis.Redis.from_url(_settings.broker_url, socket_timeout=5, socket_connect_timeout=2,
                                      health_check_interval=10)
    return _redis


def _error(code: str, message: str, retryable: bool) -> dict:
    return {"result": {"id": "", "error": {"code": code, "message": message, "retryable": retryable}}, "rm_rows": 0}


def _explain_one(engine, group: TaskGroup, entry: TaskItem, revision: str) -> dict:
    from tokencredit.types import DenseRewardsRequest

    if revision and revision != engine.model.revision:
        return _error("model_mismatch", f"worker serves revision {engine.model.revision}, the API validated for {revision}", False)
    request = DenseRewardsRequest.model_validate({**group.request, "items": [entry.item]})
    out = engine.run(request, group.weights)
    result = out.results[0].model_dump(mode="json")
    return {"result": result, "rm_rows": out.rm_rows, "device": engine.model.device, "dtype": engine.model.dtype}


def explain_batch(task, raw: dict) -> int:
    """Explain every not-yet-answered item of the payload; returns how many this delivery computed."""
    payload = TaskPayload.model_validate(raw)
    r = _client()
    prefix = payload.prefix
    task_id = task.request.id
    if not r.set(keys.started(prefix, task_id), os.getpid(), nx=True, ex=3600):
        # Another delivery started this task and never finished it: its worker died.
        r.incr(keys.stat(prefix, "redeliveries"))
        log.warning("task %s redelivered to worker %d", task_id, os.getpid())
    engine = process_engine()
    computed = 0
    ttl = payload.cache_ttl
    for group in payload.groups:
        for entry in group.items:
            item_key = keys.item(prefix, entry.uid)
            if r.exists(item_key):
                continue  # answered by an earlier delivery
            if time.time() > (payload.deadline if entry.deadline is None else entry.deadline):
                out = _error("deadline_exceeded", "the request's deadline passed before a worker reached this item", True)
            else:
                try:
                    out = _explain_one(engine, group, entry, payload.revision)
                except Exception as exc:  # e.g. a policy tokenizer the API could read and this host cannot
                    log.exception("item %s failed", entry.uid)
                    out = _error("explain_failed", f"{type(exc).__name__}: {exc}", False)
                computed += 1
            blob = json.dumps(out)
            # First write wins: a concurrent or later delivery can never replace an answer already visible.
            r.set(item_key, blob, nx=True, ex=max(60, int(payload.deadline - time.time()) + 60))
            if entry.cache_key and ttl > 0 and out["result"].get("error") is None:
                r.set(keys.cache(prefix, entry.cache_key), blob, ex=ttl)
    r.rpush(payload.reply_to, task_id)
    r.expire(payload.reply_to, 3600)
    return computed


def register(app, settings, solo: bool = True) -> None:
    """Bind the task to `app` for this worker process's settings; `solo`: the process itself runs tasks."""
    global _settings
    _settings = settings
    import redis

    app.task(
        # acks_late / reject_on_worker_lost come from the app config (make_celery).
        name=TASK_NAME, bind=True,
        # Redis blips while writing results: retry the whole (idempotent) task rather than lose it.
        autoretry_for=(redis.exceptions.ConnectionError, redis.exceptions.TimeoutError),
        retry_backoff=True, retry_backoff_max=5, max_retries=20,
    )(explain_batch)

    from celery import signals

    @signals.worker_process_init.connect(weak=False)
    def _prefork_child(**_):
        process_engine()  # prefork pool: each child loads its own model after the fork

    @signals.worker_ready.connect(weak=False)
    def _solo_ready(**_):
        if solo:
            process_engine()  # solo pool: load before the first task so it does not pay the load
