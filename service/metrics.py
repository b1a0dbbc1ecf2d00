"""Prometheus metrics (`GET /metrics`), embedded and Celery modes alike.

One registry per app (not the global one), so several apps in one process (tests, the OpenAPI renderer) never
collide. Values that live in Redis (broker queue length, redeliveries counted by workers) are read at scrape time
through `Metrics.scrape_hooks`, so /metrics shows them even though no API code path touches them.
"""

from __future__ import annotations

import time
from typing import Callable, List

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["Metrics", "MetricsMiddleware", "CONTENT_TYPE_LATEST"]


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("tokencredit_requests_total", "HTTP requests by endpoint and status", ["endpoint", "method", "status"], registry=r)
        self.latency = Histogram(
            "tokencredit_request_seconds", "HTTP request latency by endpoint and status", ["endpoint", "method", "status"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 180), registry=r,
        )
        self.queue_depth = Gauge("tokencredit_queue_depth", "Items accepted by this API and not yet answered", registry=r)
        self.broker_queue = Gauge("tokencredit_broker_queue_length", "Tasks waiting in the broker queue (-1: unknown)", registry=r)
        self.batch_items = Histogram(
            "tokencredit_batch_items", "Items per batch (one Celery task, or one embedded engine batch)",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024), registry=r,
        )
        self.rm_rows = Counter("tokencredit_rm_rows_total", "RM rows (forward-pass sequences) evaluated", registry=r)
        self.truncated = Counter(
            "tokencredit_truncated_total", "Items the scalar shims cut to fit the RM, by endpoint and part cut (prompt, response)",
            ["endpoint", "part"], registry=r,
        )
        self.cache_hits = Counter("tokencredit_cache_hits_total", "Items answered from the result cache", registry=r)
        self.cache_misses = Counter("tokencredit_cache_misses_total", "Items not found in the result cache", registry=r)
        self.worker_failures = Counter(
            "tokencredit_worker_failures_total", "Items or tasks that failed on the worker side, by reason", ["reason"], registry=r
        )
        self.dropped_items = Counter(
            "tokencredit_dropped_items_total",
            "Queued items never computed: their client went away (client_gone), the request was cancelled, or its deadline passed",
            ["reason"], registry=r,
        )
        self.queued_rows = Gauge("tokencredit_queued_rows", "Estimated RM rows of the items accepted and not yet answered", registry=r)
        self.drain_rate = Gauge("tokencredit_drain_items_per_second", "Items answered per second over the last 30 s (Retry-After is derived from it)", registry=r)
        self.redeliveries = Gauge("tokencredit_task_redeliveries", "Tasks redelivered after their worker died (from Redis)", registry=r)
        # The amortized credit head (embedded server), read from its state at scrape time (`observe_credit`).
        self.credit_version = Gauge("tokencredit_credit_head_version", "Credit head version answering (0: none yet)", registry=r)
        self.credit_spearman = Gauge(
            "tokencredit_credit_live_spearman",
            "Mean Spearman of the head's recent audited answers vs the full-budget estimate, by mode (NaN: no audit yet)",
            ["mode"], registry=r,
        )
        self.credit_audits = Gauge("tokencredit_credit_audits", "Amortized answers audited at full budget, by mode", ["mode"], registry=r)
        self.credit_fallbacks = Gauge(
            "tokencredit_credit_fallbacks", "Amortized requests answered by the permutation estimator (fidelity below the threshold), by mode",
            ["mode"], registry=r,
        )
        self.credit_examples = Gauge("tokencredit_credit_examples", "Full-budget explanations kept as training examples", registry=r)
        self.credit_trainings = Gauge("tokencredit_credit_trainings", "Credit head versions trained by this process", registry=r)
        self.scrape_hooks: List[Callable[[], None]] = []

    def observe_credit(self, credit) -> None:
        """Copy an `AmortizedCredit`'s state (or nothing, before the model is loaded) into the gauges."""
        if credit is None:
            return
        head = credit.head
        self.credit_version.set(head.version if head is not None else 0)
        stats = credit.stats
        for mode, audits in stats.audits.items():
            live = credit.live_spearman(mode)
            self.credit_spearman.labels(mode).set(float("nan") if live is None else live)
            self.credit_audits.labels(mode).set(audits)
            self.credit_fallbacks.labels(mode).set(stats.fallbacks[mode])
        self.credit_examples.set(stats.examples)
        self.credit_trainings.set(stats.trainings)

    def observe_admission(self, admission) -> None:
        """Queued rows and the drain rate of an executor's `service.batching.Admission` (at scrape time)."""
        self.queued_rows.set(admission.rows)
        self.drain_rate.set(admission.drain.per_second() or 0.0)

    def render(self) -> bytes:
        for hook in self.scrape_hooks:
            try:
                hook()
            except Exception:  # a scrape must answer even when Redis is down
                pass
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Counts and times every HTTP request by route template (not raw path: bounded label cardinality)."""

    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = {"code": 500}

        async def recording_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            labels = (endpoint, scope.get("method", ""), str(status["code"]))
            self.metrics.requests.labels(*labels).inc()
            self.metrics.latency.labels(*labels).observe(time.perf_counter() - started)
