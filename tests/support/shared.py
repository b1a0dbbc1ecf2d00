"""One live server shared by the SDK, compat and adapter tests (started on first use, killed at exit).

It is the real `service.cli serve` on loopback with the tiny encoder RM and small limits, without warm-up (shap's
JIT is not needed: these tests use cheap weights). Each start costs seconds of a 2-core machine, so every module
that only reads shares it.
"""

from __future__ import annotations

import atexit
import threading
from pathlib import Path

from tests.support.processes import spawn_server, stop, wait_ready

__all__ = ["CHEAP", "LIMITS", "live_server"]

# Cheap weights: one RM forward per token (loo) plus the last-token share; both exercise the dense path.
CHEAP = {"sparse": 0.5, "loo": 0.5}
LIMITS = {"max_items": 8, "max_response_tokens": 64, "max_total_tokens": 256}

_server: dict = {}
_lock = threading.Lock()


def live_server(model_dir, log_dir: Path) -> str:
    """URL of the shared server (started on the first call, with `model_dir`; killed at exit)."""
    with _lock:
        if "url" not in _server:
            log_path = Path(log_dir) / "sdk-server.log"
            proc, url = spawn_server(model_dir, log_path, host="127.0.0.1", log_level="warning", **LIMITS)
            atexit.register(stop, proc)
            try:
                wait_ready(proc, url, log_path)
            except BaseException:
                stop(proc)
                raise
            _server.update(url=url, proc=proc)
        return _server["url"]
