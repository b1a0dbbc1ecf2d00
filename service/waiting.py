"""What `tokencredit-server` says while it waits on something slow (building the demo RM, loading, compiling).

On stderr, so `explain --json` keeps a clean stdout. On a terminal the line counts seconds in place; elsewhere
(logs, CI) a plain line every `every_s` seconds, so a long wait is never silent and never floods a log.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Callable, Optional, TextIO

__all__ = ["Waiting", "report_when_ready"]


class Waiting:
    """`with Waiting("loading the reward model"):` prints the message, then how long it took (or that it failed)."""

    def __init__(self, message: str, stream: Optional[TextIO] = None, *, every_s: float = 15.0):
        self.message = message
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.every_s = every_s
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._started = 0.0

    def __enter__(self) -> "Waiting":
        self._started = time.monotonic()
        self.stream.write(f"{self.message} …" + ("" if self.tty else "\n"))
        self.stream.flush()
        self._thread = threading.Thread(target=self._tick, name="tokencredit-waiting", daemon=True)
        self._thread.start()
        return self

    def _tick(self) -> None:
        period = 1.0 if self.tty else self.every_s
        while not self._stop.wait(period):
            elapsed = time.monotonic() - self._started
            if self.tty:
                self.stream.write(f"\r\x1b[K{self.message} … {elapsed:.0f} s")
            else:
                self.stream.write(f"  still {self.message[:1].lower() + self.message[1:]} ({elapsed:.0f} s)\n")
            self.stream.flush()

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        elapsed = time.monotonic() - self._started
        outcome = "failed" if exc_type is not None else "done"
        if self.tty:
            self.stream.write(f"\r\x1b[K{self.message} … {outcome} in {elapsed:.1f} s\n")
        else:
            self.stream.write(f"  {outcome} in {elapsed:.1f} s\n")
        self.stream.flush()


def report_when_ready(is_ready: Callable[[], bool], error: Callable[[], Optional[str]], what: str, ready_line: str,
                      stream: Optional[TextIO] = None, every_s: float = 10.0) -> threading.Thread:
    """For `serve`: a daemon thread that says what the server waits for, every `every_s` s until the RM is ready
    (then `ready_line`) or failed to load (then the error). Plain lines: they share stderr with uvicorn's log."""
    stream = stream or sys.stderr

    def watch() -> None:
        started = time.monotonic()
        stream.write(f"waiting for {what}; /readyz answers 503 until then\n")
        stream.flush()
        next_line = started + every_s
        while True:
            failure = error()
            if failure:
                stream.write(f"the reward model failed to load: {failure}\n")
                break
            if is_ready():
                stream.write(f"ready after {time.monotonic() - started:.0f} s: {ready_line}\n")
                break
            if time.monotonic() >= next_line:
                stream.write(f"  still waiting for {what} ({time.monotonic() - started:.0f} s)\n")
                next_line += every_s
            stream.flush()
            time.sleep(0.2)
        stream.flush()

    thread = threading.Thread(target=watch, name="tokencredit-ready-watch", daemon=True)
    thread.start()
    return thread
