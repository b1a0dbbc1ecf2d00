"""What `tokencredit bo run` shows while it works.

A line when a trial starts (its shaping version and log file) and when it ends (value, best so far). On a
terminal, a bar under them is redrawn every second: trials finished / total, each running trial's elapsed time and
the best so far, so an hour-long trial is never silent. Elsewhere (a log file, CI) the bar would be noise, so the
same status is printed as a plain line every `every_s` seconds instead.
"""

from __future__ import annotations

import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Dict, Optional, TextIO

from tokencredit.bo.study import FAILED, Study, Trial

__all__ = ["Progress", "fmt_weights", "duration"]


def fmt_weights(weights: Dict[str, float]) -> str:
    return " ".join(f"{c}={w:.3f}" for c, w in weights.items())


def duration(seconds: float) -> str:
    s = max(0, int(seconds))
    h, m, r = s // 3600, (s % 3600) // 60, s % 60
    return f"{h}h{m:02d}m" if h else f"{m}m{r:02d}s" if m else f"{r}s"


class Progress:
    """Thread-safe: trials start on worker threads, end on the main thread."""

    def __init__(self, total: int, stream: Optional[TextIO] = None, *, tty: Optional[bool] = None, every_s: float = 60.0):
        self.total = total
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty
        self.every_s = every_s
        self._started: Dict[int, float] = {}
        self._lock = threading.Lock()
        self._bar_shown = False
        self._last_line = time.monotonic()
        self._status, self._done = "", 0

    # ------------------------------------------------------------------------------------------------ events
    def started(self, trial: Trial, version: int, log_path: Optional[Path]) -> None:
        with self._lock:
            self._started[trial.id] = time.monotonic()
        log = f"  log {log_path}" if log_path is not None else ""
        self._line(f"trial #{trial.id} started: {trial.source} v{version}  {fmt_weights(trial.weights)}{log}")

    def finished(self, study: Study, trial: Trial, best: Optional[Trial]) -> None:
        with self._lock:
            began = self._started.pop(trial.id, None)
        result = f"FAILED ({trial.note})" if trial.status == FAILED else f"{trial.value:.6g}"
        if trial.noise is not None:
            result += f" ± {trial.noise:.3g}"
        took = f" in {duration(time.monotonic() - began)}" if began is not None else ""
        best_text = "none" if best is None else f"{best.value:.6g} (trial {best.id})"
        self._line(f"trial {study.finished()}/{self.total}  #{trial.id} {trial.source:5s} v{trial.shaping_version}  "
                   f"{fmt_weights(trial.weights)}  -> {result}{took}  best {best_text}")

    def forget(self, trial_id: int) -> None:
        """A trial that ended without a result (its weights could not be pushed)."""
        with self._lock:
            self._started.pop(trial_id, None)

    def running(self) -> Dict[int, float]:
        """Trial id → seconds its objective command has been running."""
        now = time.monotonic()
        with self._lock:
            return {i: now - t for i, t in self._started.items()}

    # ------------------------------------------------------------------------------------------------ status
    def status(self, study: Study, best: Optional[Trial]) -> str:
        done = study.finished()
        running = ", ".join(f"#{i} {duration(s)}" for i, s in sorted(self.running().items()))
        best_text = "best none yet" if best is None else f"best {best.value:.6g} (trial {best.id})"
        return f"{done}/{self.total} trials" + (f" · running {running}" if running else "") + f" · {best_text}"

    def tick(self, study: Study, best: Optional[Trial]) -> None:
        """Called about once a second by the run loop."""
        status = self.status(study, best)
        if self.tty:
            with self._lock:
                self._status, self._done = status, study.finished()
                self._draw()
        elif time.monotonic() - self._last_line >= self.every_s:
            self._line(status)

    def close(self) -> None:
        if self.tty:
            with self._lock:
                self._clear()
                self.stream.flush()

    # ------------------------------------------------------------------------------------------------ drawing
    def _line(self, text: str) -> None:
        with self._lock:
            if self.tty:
                self._clear()
            self.stream.write(text + "\n")
            self._last_line = time.monotonic()
            # The bar comes back at the next tick (within a second), with the status this event changed.
            self.stream.flush()

    def _draw(self) -> None:
        width = shutil.get_terminal_size((100, 20)).columns
        cells = 20
        filled = min(cells, round(cells * self._done / max(1, self.total)))
        text = f"[{'#' * filled}{'-' * (cells - filled)}] {self._status}"
        self.stream.write("\r\x1b[K" + text[: max(10, width - 1)])
        self.stream.flush()
        self._bar_shown = True

    def _clear(self) -> None:
        if self._bar_shown:
            self.stream.write("\r\x1b[K")
            self._bar_shown = False
