"""BO studies as last reported by `tokencredit bo run --service URL`, kept in this process's memory for `/ui`.

The controller owns the study (its JSON file is the source of truth); the server only shows it. Each report is
the whole study, so a restarted server shows a study again from its next report (a trial starting or ending, or
the controller's heartbeat), and nothing here needs to be durable. With several API processes each shows the
studies reported to it.
"""

from __future__ import annotations

import threading
import time
from datetime import datetime, timezone
from typing import Annotated, Dict, List, Literal, Optional

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

__all__ = ["TrialReport", "StudyReport", "StudySummary", "StoredStudy", "StudyReports", "MAX_STUDIES"]

# An integer as JSON Schema has it: 3 or 3.0, never true or "3" (the models below are strict).
JSONInt = Annotated[int, BeforeValidator(lambda v: int(v) if isinstance(v, float) and v.is_integer() else v)]

# Oldest-reported studies are dropped beyond this (a server outlives many tuning runs).
MAX_STUDIES = 32


class TrialReport(BaseModel):
    """One trial as the controller sees it (`tokencredit.bo.study.Trial`, plus what only the controller knows)."""

    # strict: JSON's types as the schema states them (no `false` for a number, no "3" for an integer).
    model_config = ConfigDict(extra="ignore", strict=True)
    id: JSONInt = Field(..., ge=0)
    weights: Dict[str, float]
    status: Literal["pending", "complete", "failed"]
    value: Optional[float] = None
    noise: Optional[float] = None
    shaping_version: Optional[JSONInt] = None
    source: str = Field("sobol", max_length=32)
    finished_at: Optional[str] = Field(None, max_length=64)
    note: Optional[str] = Field(None, max_length=2000)
    # Set while the controller runs this trial's objective command: seconds since it started, at report time.
    running_for_s: Optional[float] = Field(None, ge=0)
    # Where the controller writes the trial's output (a path on the controller's machine).
    log: Optional[str] = Field(None, max_length=1000)


class StudyReport(BaseModel):
    """Body of `PUT /admin/v1/bo/studies/{name}`: the whole study, every time."""

    model_config = ConfigDict(extra="ignore", strict=True)
    components: List[str] = Field(..., min_length=2, max_length=16)
    direction: Literal["maximize", "minimize"] = "maximize"
    seed: JSONInt = 0
    n_init: JSONInt = Field(1, ge=1)
    # The `--trials` the run aims at (finished trials, complete or failed).
    target_trials: JSONInt = Field(..., ge=1)
    # running: the controller is alive; done: it reached its target; stopped: it ended early (error, Ctrl-C).
    state: Literal["running", "done", "stopped"] = "running"
    # The controller's best trial (`BayesOpt.best()`: highest GP posterior mean among observed trials once a GP
    # can be fitted), and how it was chosen.
    best_trial: Optional[JSONInt] = None
    best_how: Optional[str] = Field(None, max_length=200)
    created_at: Optional[str] = Field(None, max_length=64)
    trials: List[TrialReport] = Field(default_factory=list, max_length=10_000)


class StoredStudy(StudyReport):
    """A report as the server answers it: with when it arrived, by the server's clock."""

    name: str
    reported_at: str
    # Seconds since the report arrived, when this answer was made (the page adds its own elapsed time).
    age_s: float


class StudySummary(BaseModel):
    name: str
    state: str
    finished: int
    target_trials: int
    reported_at: str
    age_s: float


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class StudyReports:
    """name → (report, arrival time); thread-safe (reports arrive on the event loop, tests read from threads)."""

    def __init__(self, max_studies: int = MAX_STUDIES):
        self.max_studies = max_studies
        self._studies: Dict[str, tuple] = {}
        self._lock = threading.Lock()

    def put(self, name: str, report: StudyReport) -> StoredStudy:
        with self._lock:
            self._studies.pop(name, None)  # re-inserted last: the dict stays in report order
            self._studies[name] = (report, time.monotonic(), _now_iso())
            while len(self._studies) > self.max_studies:
                self._studies.pop(next(iter(self._studies)))
        return self.get(name)

    def get(self, name: str) -> Optional[StoredStudy]:
        with self._lock:
            entry = self._studies.get(name)
        if entry is None:
            return None
        report, arrived, arrived_iso = entry
        return StoredStudy(**report.model_dump(), name=name, reported_at=arrived_iso,
                           age_s=round(time.monotonic() - arrived, 3))

    def summaries(self) -> List[StudySummary]:
        with self._lock:
            entries = list(self._studies.items())
        now = time.monotonic()
        return [
            StudySummary(name=name, state=report.state, target_trials=report.target_trials,
                         finished=sum(t.status != "pending" for t in report.trials),
                         reported_at=arrived_iso, age_s=round(now - arrived, 3))
            for name, (report, arrived, arrived_iso) in reversed(entries)  # most recently reported first
        ]
