"""Kept for tests written against it: these helpers now live in `tests.support` (the lead removes this module)."""

from tests.support import (  # noqa: F401
    DEFAULT_REDIS,
    ROOT,
    cleanup_redis,
    free_port,
    metric,
    require_default_redis,
    spawn_api,
    spawn_worker,
    start_redis,
    stop,
    unique_names,
    wait_ready,
    wait_worker_loaded,
)
