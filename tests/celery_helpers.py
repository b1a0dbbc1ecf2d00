"""Real processes for the Celery tests: redis-server, `tokencredit-server worker` and `serve --broker`.

Every test module gets its own queue and Redis key prefix, so runs sharing the machine's Redis never see each
other's tasks or cache entries. Output goes to log files (no pipe can fill up and block a child).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_REDIS = "redis://127.0.0.1:6379/0"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unique_names(tag: str) -> dict:
    u = uuid.uuid4().hex[:8]
    return {"queue": f"tc-test-{tag}-{u}", "key_prefix": f"tc-test-{tag}-{u}"}


def _env(broker: str, **settings) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENCREDIT_")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT), TOKENCREDIT_BROKER_URL=broker)
    env["TOKENCREDIT_STATE_DB"] = os.environ["TOKENCREDIT_STATE_DB"]  # the tests' own file (conftest)
    # Warm-up is shap's numba JIT (~20 s on 2 cores); these tests use shap-free weights.
    env["TOKENCREDIT_WARMUP"] = "false"
    env["TOKENCREDIT_COMPILE_ROWS"] = os.environ.get("TOKENCREDIT_COMPILE_ROWS", "off")  # as the suite (conftest)
    env.update({f"TOKENCREDIT_{k.upper()}": str(v) for k, v in settings.items()})
    return env


def spawn_worker(model_dir, log_path: Path, broker: str, name: str, **settings) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "service.cli", "worker", "--model", str(model_dir), "--hostname", name, "--log-level", "info"]
    with open(log_path, "wb") as log:
        return subprocess.Popen(cmd, cwd=ROOT, env=_env(broker, **settings), stdout=log, stderr=subprocess.STDOUT)


def spawn_api(model_dir, log_path: Path, broker: str, **settings):
    port = free_port()
    cmd = [sys.executable, "-m", "service.cli", "serve", "--model", str(model_dir), "--port", str(port), "--log-level", "warning"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(broker, **settings), stdout=log, stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}"


def wait_ready(proc, url: str, log_path: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{log_path.read_text(errors='replace')[-4000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        if time.monotonic() > deadline:
            pytest.fail(f"server not ready in {timeout:.0f} s:\n{log_path.read_text(errors='replace')[-4000:]}")
        time.sleep(0.2)


def wait_worker_loaded(proc, log_path: Path, timeout: float = 120.0) -> None:
    """The worker logs '... ready in N s' once its model is loaded (tasks.load_engine)."""
    deadline = time.monotonic() + timeout
    while "ready in" not in log_path.read_text(errors="replace"):
        if proc.poll() is not None:
            pytest.fail(f"worker exited with {proc.returncode}:\n{log_path.read_text(errors='replace')[-4000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"worker not loaded in {timeout:.0f} s:\n{log_path.read_text(errors='replace')[-4000:]}")
        time.sleep(0.2)


def start_redis(port: int) -> subprocess.Popen:
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server is not installed")
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        with contextlib.suppress(OSError):
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return proc
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"redis-server did not start on port {port}")
        time.sleep(0.05)


def require_default_redis() -> None:
    with contextlib.suppress(OSError):
        with socket.create_connection(("127.0.0.1", 6379), timeout=1):
            return
    pytest.skip("no Redis at 127.0.0.1:6379 (.ci/run starts one)")


def stop(*procs) -> None:
    for proc in procs:
        if proc is not None and proc.poll() is None:
            proc.kill()
    for proc in procs:
        if proc is not None:
            with contextlib.suppress(Exception):
                proc.wait(timeout=30)


def metric(text: str, name: str) -> float:
    """Sum of a metric's samples in Prometheus text (all label sets)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def cleanup_redis(url: str, names: dict) -> None:
    """Delete what a test run left in a shared Redis: its keys, its queue and kombu's binding for it."""
    import redis

    with contextlib.suppress(redis.RedisError):
        r = redis.Redis.from_url(url, socket_timeout=2)
        doomed = list(r.scan_iter(f"{names['key_prefix']}:*", count=1000))
        doomed += [names["queue"], f"_kombu.binding.{names['queue']}", f"_kombu.binding_permanent.{names['queue']}"]
        r.delete(*doomed)
        r.close()
