"""Real server and worker processes for the tests: one free port, one spawner, one readiness wait, one stop.

Every process runs `python -m service.cli ...` from the checkout with only the `TOKENCREDIT_*` settings the test
gives (the parent's are dropped), writes its output to a log file (no pipe can fill up and block it), and is
killed by `stop`. The interpreter is the test's own, or `$TC_TESTS_SERVER_PYTHON` when the tests run in an
environment without the server (the SDK's torch-free venv, see `tests/test_sdk_alone.py`).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, Optional

import httpx
import pytest

__all__ = [
    "ROOT", "SERVER_PYTHON", "free_port", "server_env", "spawn_server", "spawn_api", "spawn_worker", "wait_ready",
    "wait_worker_loaded", "stop", "running_server",
]

ROOT = Path(__file__).resolve().parents[2]
# The interpreter that runs servers and workers (and builds the tiny models when the tests' own cannot).
SERVER_PYTHON = os.environ.get("TC_TESTS_SERVER_PYTHON") or sys.executable
_UNSET = object()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(**settings) -> dict:
    """The environment of a spawned process: the parent's minus its `TOKENCREDIT_*`, plus `settings`.

    Defaults, each overridable and dropped when given as None (then the server's own default applies):
    `state_db` the tests' own file (conftest: no test reads or leaves a version in ~/.cache/tokencredit),
    `credit_dir` the tests' own folder of credit heads (likewise),
    `warmup=false` (warm-up is shap's numba JIT, ~20 s on 2 cores; tests that need it turn it on),
    `compile_rows` as the suite's (conftest: off).
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENCREDIT_")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT))
    defaults = {
        "state_db": os.environ.get("TOKENCREDIT_STATE_DB"),
        # Credit heads the servers learn go to the tests' folder too (conftest), never to ~/.cache/tokencredit.
        "credit_dir": os.environ.get("TOKENCREDIT_CREDIT_DIR"),
        "warmup": "false",
        "compile_rows": os.environ.get("TOKENCREDIT_COMPILE_ROWS", "off"),
    }
    for name, value in {**defaults, **settings}.items():
        if value is not None:
            env[f"TOKENCREDIT_{name.upper()}"] = str(value)
    return env


def _launch(args, log_path: Path, env: dict, append: bool) -> subprocess.Popen:
    cmd = [SERVER_PYTHON, "-m", "service.cli", *map(str, args)]
    with open(log_path, "ab" if append else "wb") as log:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def spawn_server(model_dir, log_path: Path, *, host: Optional[str] = None, broker: Optional[str] = None,
                 log_level: str = "info", **settings):
    """Start `tokencredit-server serve` on a free loopback port; returns (proc, base URL). Pair with `wait_ready`.

    Args:
        model_dir: The RM directory (`--model`).
        log_path: Output goes here, appended: a restarted server keeps its predecessor's log.
        host: `--host`; None passes no flag, so the server binds its default (127.0.0.1).
        broker: The Redis URL of the Celery path (`TOKENCREDIT_BROKER_URL`); None serves embedded.
        settings: `TOKENCREDIT_<NAME>` values (see `server_env` for the defaults; None drops one).
    """
    port = free_port()
    args = ["serve", "--model", model_dir, "--port", port, "--log-level", log_level]
    if host is not None:
        args += ["--host", host]
    env = server_env(**settings, **({"broker_url": broker} if broker else {}))
    return _launch(args, log_path, env, append=True), f"http://127.0.0.1:{port}"


def spawn_api(model_dir, log_path: Path, broker: str, **settings):
    """`serve --broker`: the API in front of Celery workers; returns (proc, base URL)."""
    return spawn_server(model_dir, log_path, broker=broker, log_level="warning", **settings)


def spawn_worker(model_dir, log_path: Path, broker: str, name: str, **settings) -> subprocess.Popen:
    """`tokencredit-server worker` named `name`. Its log is truncated: `wait_worker_loaded` reads it."""
    args = ["worker", "--model", model_dir, "--hostname", name, "--log-level", "info"]
    return _launch(args, log_path, server_env(broker_url=broker, **settings), append=False)


@contextlib.contextmanager
def running_server(model_dir, log_path: Path, *, secret: Optional[str] = None, **kwargs) -> Iterator[str]:
    """`spawn_server` (same arguments), ready, for the `with` block (its URL); stopped after it. With `secret` (a
    token the server was given), the server's whole log is checked afterwards: the secret must not be in it."""
    proc, url = spawn_server(model_dir, log_path, **kwargs)
    try:
        wait_ready(proc, url, log_path)
        yield url
    finally:
        stop(proc)
    if secret is not None:
        assert secret not in Path(log_path).read_text(errors="replace"), f"{log_path} shows the secret"


def _log_tail(log_path: Path) -> str:
    return Path(log_path).read_text(errors="replace")[-4000:]


def wait_ready(proc, url: str, log_path: Path, timeout: float = 120.0) -> None:
    """Until `GET /readyz` answers 200; fails the test with the log's tail if the process exits or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{_log_tail(log_path)}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        if time.monotonic() > deadline:
            pytest.fail(f"server not ready in {timeout:.0f} s:\n{_log_tail(log_path)}")
        time.sleep(0.2)


def wait_worker_loaded(proc, log_path: Path, timeout: float = 120.0) -> None:
    """The worker logs '... ready in N s' once its model is loaded."""
    deadline = time.monotonic() + timeout
    while "ready in" not in Path(log_path).read_text(errors="replace"):
        if proc.poll() is not None:
            pytest.fail(f"worker exited with {proc.returncode}:\n{_log_tail(log_path)}")
        if time.monotonic() > deadline:
            pytest.fail(f"worker not loaded in {timeout:.0f} s:\n{_log_tail(log_path)}")
        time.sleep(0.2)


def stop(*procs) -> None:
    """Kill each process that still runs, then reap them all (None entries are skipped)."""
    for proc in procs:
        if proc is not None and proc.poll() is None:
            proc.kill()
    for proc in procs:
        if proc is not None:
            with contextlib.suppress(Exception):
                proc.wait(timeout=30)

