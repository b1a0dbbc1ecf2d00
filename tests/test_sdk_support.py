"""Helpers (no tests) for the SDK, compat and adapter tests: one live TokenCredit server per test session, and a
fault-injecting proxy in front of it.

The server is the real `service.cli serve` on loopback with the tiny encoder RM, without warm-up (shap's JIT is
not needed: these tests use cheap weights). It is started once, on first use, and shared by every module that
asks for it, because each start costs seconds of a 2-core machine.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import List, Optional

import httpx

ROOT = Path(__file__).resolve().parents[1]
# Cheap weights: one RM forward per token (loo) plus the last-token share; both exercise the dense path.
CHEAP = {"sparse": 0.5, "loo": 0.5}
LIMITS = {"max_items": 8, "max_response_tokens": 64, "max_total_tokens": 256}

_server: dict = {}
_lock = threading.Lock()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def live_server(model_dir, log_dir: Path) -> str:
    """URL of the shared server (started on first call; killed at exit)."""
    with _lock:
        if "url" in _server:
            return _server["url"]
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENCREDIT_")}
        env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT), TOKENCREDIT_WARMUP="false")
        env["TOKENCREDIT_STATE_DB"] = os.environ["TOKENCREDIT_STATE_DB"]  # the tests' own file (conftest)
        env.update({f"TOKENCREDIT_{k.upper()}": str(v) for k, v in LIMITS.items()})
        log_path = Path(log_dir) / "sdk-server.log"
        cmd = [sys.executable, "-m", "service.cli", "serve", "--model", str(model_dir), "--host", "127.0.0.1",
               "--port", str(port), "--log-level", "warning"]
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        atexit.register(_stop, proc)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{log_path.read_text(errors='replace')[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready:\n{log_path.read_text(errors='replace')[-3000:]}")
            time.sleep(0.2)
        _server.update(url=url, proc=proc)
        return url


def _stop(proc) -> None:
    proc.kill()
    with contextlib.suppress(Exception):
        proc.wait(timeout=30)


class FaultProxy:
    """A raw-TCP HTTP/1.1 proxy on loopback in front of the real server that injects faults from a script.

    `script` is consumed one entry per POST /v1/dense_rewards (GETs pass through): `"pass"`, `"drop"` (abort
    the connection without a byte of answer: what a crashed pod or a reset looks like), or `(status, headers)` for
    a synthetic TokenCredit error body (`headers` may carry `field`). Every rewards request is recorded in `calls`
    with its Idempotency-Key, item count and deadline. Raw TCP because an ASGI app cannot drop a connection.
    """

    def __init__(self, upstream: str):
        self.upstream = upstream
        self.script: List = []
        self.calls: List[dict] = []
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._started = threading.Event()

    async def _handle(self, reader, writer):
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        k, v = line.split(":", 1)
                        headers[k.strip().lower()] = v.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                action = "pass"
                if method == "POST" and path == "/v1/dense_rewards":
                    sent = json.loads(body)
                    self.calls.append({"key": headers.get("idempotency-key"), "items": len(sent["items"]),
                                       "deadline_ms": sent.get("deadline_ms")})
                    action = self.script.pop(0) if self.script else "pass"
                if action == "drop":
                    writer.transport.abort()
                    return
                if action == "pass":
                    fwd = {k: v for k, v in headers.items() if k not in ("host", "content-length", "connection")}
                    async with httpx.AsyncClient(base_url=self.upstream, timeout=120) as client:
                        r = await client.request(method, path, content=body, headers=fwd)
                    status, out, extra = r.status_code, r.content, {}
                else:
                    status, extra = action[0], dict(action[1] or {})
                    codes = {413: "payload_too_large", 422: "invalid_request", 429: "overloaded", 503: "not_ready"}
                    out = json.dumps({"error": {"code": codes.get(status, "internal"), "message": "injected",
                                                "field": extra.pop("field", None),
                                                "retryable": status in (429, 500, 503)}}).encode()
                head_out = [f"HTTP/1.1 {status} X", "content-type: application/json", f"content-length: {len(out)}"]
                head_out += [f"{k}: {v}" for k, v in extra.items()]
                writer.write(("\r\n".join(head_out) + "\r\n\r\n").encode() + out)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def _run(self):
        self._loop = asyncio.new_event_loop()

        async def main():
            server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
            self._started.set()
            async with server:
                await server.serve_forever()

        try:
            self._loop.run_until_complete(main())
        except (asyncio.CancelledError, RuntimeError):
            pass

    def __enter__(self) -> "FaultProxy":
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._started.wait(20):
            raise RuntimeError("fault proxy did not start")
        return self

    def __exit__(self, *exc) -> None:
        loop = self._loop
        loop.call_soon_threadsafe(lambda: [t.cancel() for t in asyncio.all_tasks(loop)])
        self._thread.join(timeout=10)
