"""A tuning study as a JSON file: the components tuned, the seed, and every trial (pure Python, no torch).

The file is the single source of truth. It is rewritten after every change (a trial suggested, its shaping
version recorded, observed or failed), atomically (a temporary file in the same folder, fsync, `os.replace`),
so a controller killed at any instant leaves either the old or the new study on disk, never half of one.
A trial suggested but not observed is saved as `pending`: after a restart it is offered again (same id, same
weights) rather than lost or duplicated.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import threading
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

__all__ = ["Trial", "Study", "PENDING", "COMPLETE", "FAILED", "FORMAT"]

FORMAT = "tokencredit-bo-study/1"
PENDING, COMPLETE, FAILED = "pending", "complete", "failed"
DIRECTIONS = ("maximize", "minimize")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def atomic_write(path: Path, write: Callable[[str], None], suffix: str = "") -> None:
    """`write(tmp)` into a temporary file beside `path`, then rename it over `path`: readers (and a controller
    killed mid-write) see the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@dataclass
class Trial:
    """One evaluation of the objective at simplex weights `weights` (keys: the study's components).

    `noise` is the standard deviation of `value` when the objective reports one; `shaping_version` the admin
    version the weights were pushed as; `source` says how the point was chosen (`sobol` or `bo`).
    """

    id: int
    weights: Dict[str, float]
    status: str = PENDING
    value: Optional[float] = None
    noise: Optional[float] = None
    shaping_version: Optional[int] = None
    source: str = "sobol"
    started_at: str = field(default_factory=_now)
    finished_at: Optional[str] = None
    note: Optional[str] = None

    @classmethod
    def from_json(cls, raw: Dict[str, Any]) -> "Trial":
        return cls(**{k: raw[k] for k in cls.__dataclass_fields__ if k in raw})


class Study:
    """The trials of one tuning run over the simplex of `components`, saved to `path` after every change.

    Thread-safe: the CLI observes trials from worker threads while the main thread suggests new ones.
    """

    def __init__(self, components: Sequence[str], *, seed: int = 0, n_init: int = 5, direction: str = "maximize",
                 path: Union[str, Path, None] = None, trials: Sequence[Trial] = (), created_at: Optional[str] = None):
        components = [str(c) for c in components]
        if len(components) < 2 or len(set(components)) != len(components):
            raise ValueError(f"a study needs at least two distinct components, got {components}")
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        if n_init < 1:
            raise ValueError("n_init must be >= 1")
        self.components, self.seed, self.n_init, self.direction = components, int(seed), int(n_init), direction
        self.path = Path(path) if path is not None else None
        self.trials: List[Trial] = list(trials)
        self.created_at = created_at or _now()
        self._lock = threading.RLock()

    # ------------------------------------------------------------------------------------------------ file
    @classmethod
    def load(cls, path: Union[str, Path]) -> "Study":
        raw = json.loads(Path(path).read_text())
        if raw.get("format") != FORMAT:
            raise ValueError(f"{path} is not a TokenCredit BO study (format {raw.get('format')!r}, want {FORMAT!r})")
        return cls(raw["components"], seed=raw["seed"], n_init=raw["n_init"], direction=raw.get("direction", "maximize"),
                   path=path, trials=[Trial.from_json(t) for t in raw["trials"]], created_at=raw.get("created_at"))

    @classmethod
    def open(cls, path: Union[str, Path], components: Sequence[str], **kwargs) -> "Study":
        """Resume the study at `path` if it exists (its components must be `components`), else start one there.

        A resumed study keeps its own seed, n_init and direction (they define the trials already run).
        """
        path = Path(path)
        if path.exists():
            study = cls.load(path)
            if list(study.components) != [str(c) for c in components]:
                raise ValueError(f"{path} tunes {study.components}, not {list(components)}: "
                                 "use another --study file or the same components")
            return study
        study = cls(components, path=path, **kwargs)
        study.save()
        return study

    def to_json(self) -> Dict[str, Any]:
        with self._lock:
            return {"format": FORMAT, "components": self.components, "seed": self.seed, "n_init": self.n_init,
                    "direction": self.direction, "created_at": self.created_at, "updated_at": _now(),
                    "trials": [asdict(t) for t in self.trials]}

    def save(self) -> None:
        """Write the study atomically (no-op for an in-memory study)."""
        if self.path is None:
            return
        with self._lock:
            text = json.dumps(self.to_json(), indent=1)

            def write(tmp: str) -> None:
                with open(tmp, "w") as f:
                    f.write(text)
                    f.flush()
                    os.fsync(f.fileno())

            atomic_write(self.path, write)

    # ------------------------------------------------------------------------------------------------ changes
    def add_trial(self, weights: Dict[str, float], source: str) -> Trial:
        with self._lock:
            if sorted(weights) != sorted(self.components):
                raise ValueError(f"weights {sorted(weights)} do not name the study's components {self.components}")
            trial = Trial(id=len(self.trials), weights={c: float(weights[c]) for c in self.components}, source=source)
            self.trials.append(trial)
            self.save()
            return trial

    def set_version(self, trial_id: int, version: int) -> Trial:
        with self._lock:
            trial = self.trial(trial_id)
            trial.shaping_version = int(version)
            self.save()
            return trial

    def complete(self, trial_id: int, value: float, noise: Optional[float] = None) -> Trial:
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"objective value must be finite, got {value}")
        if noise is not None and (not math.isfinite(float(noise)) or float(noise) < 0):
            raise ValueError(f"noise (a standard deviation) must be finite and >= 0, got {noise}")
        with self._lock:
            trial = self._pending(trial_id)
            trial.status, trial.value, trial.finished_at = COMPLETE, value, _now()
            trial.noise = None if noise is None else float(noise)
            self.save()
            return trial

    def fail(self, trial_id: int, reason: str) -> Trial:
        with self._lock:
            trial = self._pending(trial_id)
            trial.status, trial.note, trial.finished_at = FAILED, str(reason)[:2000], _now()
            self.save()
            return trial

    # ------------------------------------------------------------------------------------------------ queries
    def trial(self, trial_id: int) -> Trial:
        with self._lock:
            if not 0 <= int(trial_id) < len(self.trials):
                raise KeyError(f"no trial {trial_id} (the study has {len(self.trials)})")
            return self.trials[int(trial_id)]

    def _pending(self, trial_id: int) -> Trial:
        trial = self.trial(trial_id)
        if trial.status != PENDING:
            raise ValueError(f"trial {trial.id} is already {trial.status}; each trial is observed once")
        return trial

    def by_status(self, status: str) -> List[Trial]:
        with self._lock:
            return [t for t in self.trials if t.status == status]

    def completed(self) -> List[Trial]:
        return self.by_status(COMPLETE)

    def pending(self) -> List[Trial]:
        return self.by_status(PENDING)

    def finished(self) -> int:
        """Trials that are over (complete or failed): what `--trials N` counts."""
        with self._lock:
            return sum(t.status != PENDING for t in self.trials)

    def better(self, a: float, b: float) -> bool:
        return a > b if self.direction == "maximize" else a < b

    def best_observed(self) -> Optional[Trial]:
        best = None
        for t in self.completed():
            if best is None or self.better(t.value, best.value):
                best = t
        return best

    def best_so_far(self) -> List[Optional[float]]:
        """Per trial (in id order), the best value observed among trials up to it (None before any)."""
        out, best = [], None
        for t in list(self.trials):
            if t.status == COMPLETE and (best is None or self.better(t.value, best)):
                best = t.value
            out.append(best)
        return out
