"""Reports a running study to the server (`PUT /admin/v1/bo/studies/{name}`), so its web page (`/ui#bo`) shows it.

The whole study goes every time (tens of trials: a few KB), so the server keeps nothing durable and a restarted
server is complete again after the next report. A report that fails never stops the tuning run: the first
failure is printed once, later ones are silent.
"""

from __future__ import annotations

import re
import sys
import threading
from pathlib import Path
from typing import Callable, Dict, Optional

from tokencredit.bo.study import Study, Trial

__all__ = ["StudyReporter", "report_name", "study_report"]


def report_name(study_path: Path) -> str:
    """The study's name on the server: its file's stem, in the characters the server accepts."""
    name = re.sub(r"[^A-Za-z0-9._-]", "-", Path(study_path).stem).lstrip("._-")[:64]
    return name or "study"


def study_report(study: Study, *, target_trials: int, state: str, running: Dict[int, float],
                 best: Optional[Trial], best_how: Optional[str], log_path: Callable[[int], Optional[Path]]) -> dict:
    """The body of a report: the study file's content plus what only the controller knows."""
    raw = study.to_json()
    trials = []
    for t in raw["trials"]:
        log = log_path(t["id"])
        trials.append({**t, "running_for_s": running.get(t["id"]),
                       # Absolute: whoever reads the page does not know the controller's working directory.
                       "log": str(log.resolve()) if log is not None and log.exists() else None})
    return {"components": raw["components"], "direction": raw["direction"], "seed": raw["seed"],
            "n_init": raw["n_init"], "created_at": raw["created_at"], "target_trials": target_trials, "state": state,
            "best_trial": None if best is None else best.id, "best_how": best_how, "trials": trials}


class StudyReporter:
    """Sends `study_report`s through an `AdminClient` (the admin token: only a tuner may report)."""

    def __init__(self, admin, name: str, stream=None):
        self.admin, self.name = admin, name
        self.stream = stream or sys.stderr
        self.sent = 0
        self._warned = False
        # Reports come from worker threads (a trial starting) and the main thread: one at a time, so an older
        # snapshot can never arrive after a newer one.
        self._lock = threading.Lock()

    def report(self, make_body: Callable[[], dict]) -> bool:
        from tokencredit.errors import TokenCreditError

        with self._lock:
            try:
                self.admin.put_bo_study(self.name, make_body())
            except TokenCreditError as exc:
                if not self._warned:
                    self._warned = True
                    print(f"tokencredit bo: the server did not take the study report ({exc}); the run goes on, "
                          f"but {self.admin.base_url}/ui will not show it", file=self.stream, flush=True)
                return False
            self.sent += 1
            return True
