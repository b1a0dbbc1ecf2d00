"""A fault-injecting HTTP proxy in front of a real server (the SDK's retry, split and fallback tests)."""

from __future__ import annotations

import asyncio
import json
import threading
from typing import List, Optional

import httpx

from tests.support.processes import free_port

__all__ = ["FaultProxy"]


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
