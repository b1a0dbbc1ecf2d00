"""The Celery app shared by the API (which only publishes) and the workers (which consume).

Broker and result backend are Redis (`TOKENCREDIT_BROKER_URL`). Delivery is at-least-once: `acks_late` plus
`reject_on_worker_lost` keep a task in Redis's unacked set until it finishes, and a task whose worker died
(SIGKILL, OOM) is put back after `visibility_timeout_s`. Workers write results keyed by item id with SET NX, so a
redelivery can never produce a second or different answer (see `workers/tasks.py`).

The task's one argument is a `TaskPayload` as JSON: `service/dispatch.py` builds and validates it, the worker
validates it again before it explains anything.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from celery import Celery
from pydantic import BaseModel, ConfigDict

from tokencredit.types import DenseRewardItem, ShapingWeights

__all__ = ["make_celery", "TASK_NAME", "keys", "TaskPayload", "TaskGroup", "TaskItem"]

TASK_NAME = "tokencredit.explain"


class _Message(BaseModel):
    # A field the other side does not know is a version mismatch between API and workers: fail loudly.
    model_config = ConfigDict(extra="forbid")


class TaskItem(_Message):
    """One item to explain, written by the worker under `keys.item(prefix, uid)`."""

    uid: str
    # Key of the result cache (`keys.cache`), or None when the cache is off.
    cache_key: Optional[str] = None
    # The item as the caller sent it, without its id (the API puts the caller's id back).
    item: DenseRewardItem
    # Unix seconds: past it, the worker answers `deadline_exceeded` instead of explaining (None: the payload's).
    deadline: Optional[float] = None


class TaskGroup(_Message):
    """Items of one request: each is explained as a one-item request with the group's fields and weights."""

    # The request's JSON without items, weights and deadline_ms.
    request: Dict[str, Any]
    weights: ShapingWeights
    items: List[TaskItem]


class TaskPayload(_Message):
    """One micro-batch: the task's argument."""

    # The API process's reply list (`keys.reply`): the worker pushes the task id there when it is done.
    reply_to: str
    # The deployment's Redis key prefix.
    prefix: str
    # The RM revision the API validated for; a worker serving another one refuses the items ("" skips the check).
    revision: str = ""
    # Unix seconds: the latest deadline of the items.
    deadline: float
    # Seconds the worker keeps each answer in the result cache (0: not cached).
    cache_ttl: int = 0
    groups: List[TaskGroup]


class keys:
    """Redis key layout; every key starts with the deployment's prefix so deployments can share one Redis."""

    @staticmethod
    def item(prefix: str, uid: str) -> str:
        # One explained item; written once (SET NX) by whichever delivery finishes first.
        return f"{prefix}:item:{uid}"

    @staticmethod
    def cache(prefix: str, digest: str) -> str:
        return f"{prefix}:cache:{digest}"

    @staticmethod
    def reply(prefix: str, api_id: str) -> str:
        # Each API process BLPOPs its own list of finished task ids.
        return f"{prefix}:reply:{api_id}"

    @staticmethod
    def started(prefix: str, task_id: str) -> str:
        # Present when a delivery of this task already started: a second start is a redelivery.
        return f"{prefix}:started:{task_id}"

    @staticmethod
    def stat(prefix: str, name: str) -> str:
        return f"{prefix}:stats:{name}"


def make_celery(settings) -> Celery:
    """A Celery app for `settings.broker_url` and `settings.queue` (API and workers build the same one)."""
    url = settings.broker_url
    app = Celery("tokencredit", broker=url, backend=url)
    app.conf.update(
        task_default_queue=settings.queue,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        # Results travel through our own item keys (idempotent, cacheable); Celery's result records would be
        # a second, non-idempotent copy.
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # One task reserved per process: a killed worker strands at most the task it was running.
        worker_prefetch_multiplier=1,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout_s,
            # Check for stranded tasks every second (kombu's default scans every ~100 s).
            "unacked_restore_interval": 1,
            "unacked_restore_throttle": 1,
            "socket_timeout": 5,
            "socket_connect_timeout": 2,
        },
        # Publishing while Redis is down must fail fast (the API answers 503), not retry for seconds.
        task_publish_retry_policy={"max_retries": 1, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.2},
        broker_heartbeat=0,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    return app
