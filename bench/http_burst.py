"""Many concurrent HTTP/1.1 POSTs from one process, as a training cluster sends them (one connection per request).

A raw asyncio client: an HTTP library's own per-request cost (httpx: ~1-2 ms of CPU) would be measured along with
the server's on a machine with two cores. Used by `bench/serving.py` and `tests/test_load.py`.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

__all__ = ["Answer", "burst", "percentile", "post"]


@dataclass
class Answer:
    status: int  # 0: no HTTP answer (connection refused, reset, timed out)
    body: Optional[dict]
    seconds: float
    error: Optional[str] = None
    headers: Optional[dict] = None


async def post(host: str, port: int, path: str, payload: dict, timeout: float = 300.0) -> Answer:
    """One POST on its own connection; the answer's status, JSON body and latency."""
    started = time.perf_counter()
    body = json.dumps(payload).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    writer = None
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        writer.write(head + body)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), timeout)  # Connection: close → the body ends with the stream
    except (OSError, asyncio.TimeoutError) as exc:
        return Answer(0, None, time.perf_counter() - started, f"{type(exc).__name__}: {exc}")
    finally:
        if writer is not None:
            writer.close()
    seconds = time.perf_counter() - started
    header_end = raw.find(b"\r\n\r\n")
    if header_end < 0:
        return Answer(0, None, seconds, "no HTTP answer")
    lines = raw[:header_end].decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:] if ":" in line)}
    content = raw[header_end + 4:]
    if headers.get("transfer-encoding") == "chunked":
        content = _unchunk(content)
    try:
        parsed = json.loads(content) if content else None
    except ValueError:
        parsed = None
    return Answer(status, parsed, seconds, headers=headers)


def _unchunk(data: bytes) -> bytes:
    out, i = bytearray(), 0
    while True:
        j = data.index(b"\r\n", i)
        size = int(data[i:j].split(b";")[0], 16)
        if size == 0:
            return bytes(out)
        out += data[j + 2:j + 2 + size]
        i = j + 2 + size + 2


async def burst(host: str, port: int, requests: Sequence[Tuple[str, dict]], timeout: float = 300.0) -> Tuple[List[Answer], float]:
    """All `requests` ((path, payload) pairs) at once; their answers in order and the wall time of the whole burst."""
    started = time.perf_counter()
    answers = await asyncio.gather(*[post(host, port, path, payload, timeout) for path, payload in requests])
    return list(answers), time.perf_counter() - started


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) by nearest rank."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, min(len(ordered), round(q / 100.0 * len(ordered) + 0.5)))
    return ordered[rank - 1]
