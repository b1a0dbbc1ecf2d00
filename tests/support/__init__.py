"""Test support (no tests): real processes (`processes`), Redis (`broker`), the shared live server (`shared`),
the fault-injecting proxy (`proxy`) and Prometheus text (`metrics`). Everything is re-exported here."""

from tests.support.metrics import metric
from tests.support.processes import (
    ROOT,
    SERVER_PYTHON,
    free_port,
    running_server,
    server_env,
    spawn_api,
    spawn_server,
    spawn_worker,
    stop,
    wait_ready,
    wait_worker_loaded,
)
from tests.support.proxy import FaultProxy
from tests.support.broker import DEFAULT_REDIS, cleanup_redis, require_default_redis, start_redis, unique_names
from tests.support.shared import CHEAP, LIMITS, live_server

__all__ = [
    "ROOT", "SERVER_PYTHON", "free_port", "server_env", "spawn_server", "spawn_api", "spawn_worker", "wait_ready",
    "wait_worker_loaded", "stop", "running_server", "metric", "FaultProxy", "DEFAULT_REDIS", "unique_names", "start_redis",
    "require_default_redis", "cleanup_redis", "CHEAP", "LIMITS", "live_server",
]
