"""Redis for the Celery tests: the machine's shared instance (per-module queue and key prefix) or a private one."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
import uuid

import pytest

__all__ = ["DEFAULT_REDIS", "unique_names", "start_redis", "require_default_redis", "cleanup_redis"]

DEFAULT_REDIS = "redis://127.0.0.1:6379/0"


def unique_names(tag: str) -> dict:
    """A queue and a key prefix of its own, so runs sharing the machine's Redis never see each other's tasks or keys."""
    u = uuid.uuid4().hex[:8]
    return {"queue": f"tc-test-{tag}-{u}", "key_prefix": f"tc-test-{tag}-{u}"}


def start_redis(port: int) -> subprocess.Popen:
    """A private redis-server on loopback (tests that stop and restart it); skips the test without the binary."""
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


def cleanup_redis(url: str, names: dict) -> None:
    """Delete what a test run left in a shared Redis: its keys, its queue and kombu's binding for it."""
    import redis

    with contextlib.suppress(redis.RedisError):
        r = redis.Redis.from_url(url, socket_timeout=2)
        doomed = list(r.scan_iter(f"{names['key_prefix']}:*", count=1000))
        doomed += [names["queue"], f"_kombu.binding.{names['queue']}", f"_kombu.binding_permanent.{names['queue']}"]
        r.delete(*doomed)
        r.close()
