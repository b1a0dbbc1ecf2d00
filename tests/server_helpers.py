"""A real `tokencredit-server serve` on loopback for tests that talk to it over HTTP (admin API, BO CLI)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.celery_helpers import free_port

ROOT = Path(__file__).resolve().parents[1]


def spawn_server(model_dir, log_path: Path, **settings):
    """Start the server (embedded executor) with `TOKENCREDIT_<NAME>=value` settings; returns (proc, base URL).

    The parent's TOKENCREDIT_* variables are dropped so each server sees only its own settings; pair with
    `tests.celery_helpers.wait_ready` and `stop`.
    """
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENCREDIT_")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT), TOKENCREDIT_WARMUP="false")
    env["TOKENCREDIT_COMPILE_ROWS"] = os.environ.get("TOKENCREDIT_COMPILE_ROWS", "off")  # as the suite (conftest)
    env.update({f"TOKENCREDIT_{k.upper()}": str(v) for k, v in settings.items()})
    cmd = [sys.executable, "-m", "service.cli", "serve", "--model", str(model_dir), "--port", str(port), "--log-level", "info"]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}"
