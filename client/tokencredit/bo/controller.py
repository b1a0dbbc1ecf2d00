"""`BayesOpt`: suggest simplex weights, observe the objective, resume from the study file.

    from tokencredit.bo import BayesOpt

    bo = BayesOpt.open("study.json", ["sparse", "attention", "shap", "lime", "loo"], seed=0, n_init=5)
    trial = bo.suggest()                 # Trial(id, weights, ...), saved as pending
    bo.observe(trial, value=0.71)        # or noise=0.02 (a standard deviation); bo.fail(trial, "diverged")
    bo.best().weights

Several `suggest()` calls before observing give different points (pending trials are passed to the
acquisition as `X_pending`), and trials may be observed in any order. A study reopened after a crash first
re-offers its pending trials (same id and weights) through `suggest()`, so none is lost or duplicated.

torch and botorch are imported on the first suggestion that needs them, not with this module.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import List, Optional, Sequence, Set, Tuple, Union

from tokencredit.bo.study import FAILED, Study, Trial

__all__ = ["BayesOpt"]

TrialRef = Union[Trial, int]
# A GP needs a few points before it says more than the prior; before that, Sobol points continue.
_MIN_POINTS_FOR_GP = 2


class BayesOpt:
    """Bayesian optimisation of shaping weights over the simplex, backed by a `Study` (and its JSON file).

    Args:
        study: the study (from `Study(...)`, `Study.load` or `BayesOpt.open`).
        num_restarts, raw_samples, mc_samples: `optimize_acqf` restarts / raw samples and the QMC samples of
            the acquisition. The defaults cost ~2-3 s per suggestion on one CPU core for five weights, nothing
            next to a training run; fewer (4 / 128) are ~2x faster and reached the same optimum less reliably
            on the synthetic objective of tests/test_bo.py.
    """

    def __init__(self, study: Study, *, num_restarts: int = 8, raw_samples: int = 256, mc_samples: int = 128):
        self.study = study
        self.num_restarts, self.raw_samples, self.mc_samples = num_restarts, raw_samples, mc_samples
        # Pending trials handed out by this controller; pending ones it did not hand out come from a previous
        # (killed) run and are re-offered first.
        self._offered: Set[int] = set()
        self._model_key: Optional[Tuple] = None
        self._model = None
        self._lock = threading.RLock()

    @classmethod
    def open(cls, path: Union[str, Path], components: Sequence[str], *, seed: int = 0, n_init: int = 5,
             direction: str = "maximize", **kwargs) -> "BayesOpt":
        """Resume the study at `path`, or start it there (see `Study.open`)."""
        return cls(Study.open(path, components, seed=seed, n_init=n_init, direction=direction), **kwargs)

    # ------------------------------------------------------------------------------------------------ API
    @property
    def components(self) -> List[str]:
        return self.study.components

    def pending(self) -> List[Trial]:
        return self.study.pending()

    def suggest(self) -> Trial:
        """The next trial to run: a pending trial left by a previous run, else a new point (saved as pending).

        New points are Sobol points for the first `n_init` trials (and until two observations exist), then
        the maximiser of qLogNEI given the observations and the other pending trials.
        """
        with self._lock:
            for trial in self.study.pending():
                if trial.id not in self._offered:
                    self._offered.add(trial.id)
                    return trial
            trial = self._new_trial()
            self._offered.add(trial.id)
            return trial

    def observe(self, trial: TrialRef, value: float, noise: Optional[float] = None) -> Trial:
        """Record the objective `value` of a pending trial (`noise`: its standard deviation, if known)."""
        return self.study.complete(_id(trial), value, noise)

    def fail(self, trial: TrialRef, reason: str) -> Trial:
        """Record that a pending trial could not be evaluated: left out of the GP, kept as a point to avoid."""
        return self.study.fail(_id(trial), reason)

    def best(self) -> Optional[Trial]:
        """The best observed trial, or None before any observation.

        Once a GP can be fitted (two or more observations), "best" is the observed point with the highest GP
        posterior mean (lowest for `minimize`), not the highest raw value: with a noisy objective the luckiest
        draw is often not the best weights, and the GP pools the neighbouring evidence. Before that, it is the
        best raw value.
        """
        with self._lock:
            done = self.study.completed()
            if len(done) < _MIN_POINTS_FOR_GP:
                return self.study.best_observed()
            from tokencredit.bo import optimizer

            model, obs = self._fit(done)
            mean = optimizer.posterior_mean(model, obs.x)
            return done[int(mean.argmax())]

    # ------------------------------------------------------------------------------------------------ internals
    def _new_trial(self) -> Trial:
        import numpy as np

        from tokencredit.bo import optimizer

        study, index = self.study, len(self.study.trials)
        k = len(study.components)
        done = study.completed()
        if index < study.n_init or len(done) < _MIN_POINTS_FOR_GP:
            w, source = optimizer.sobol_point(index, k, study.seed), "sobol"
        else:
            model, obs = self._fit(done)
            # Failed trials join the pending ones: the acquisition then discounts their exact point, so a
            # point that crashed the objective is not proposed again verbatim (it would be: it taught the GP nothing).
            avoid = study.pending() + study.by_status(FAILED)
            pending_x = [optimizer.to_free(self._vector(t)) for t in avoid]
            w = optimizer.propose(model, obs, pending_x, seed=_seed(study.seed, index), num_restarts=self.num_restarts,
                                  raw_samples=self.raw_samples, mc_samples=self.mc_samples)
            source = "bo"
        w = np.asarray(w, dtype=np.float64)
        return study.add_trial({c: float(w[i]) for i, c in enumerate(study.components)}, source)

    def _vector(self, trial: Trial):
        import numpy as np

        return np.asarray([trial.weights[c] for c in self.study.components], dtype=np.float64)

    def _fit(self, done: List[Trial]):
        """The GP on the completed trials, refitted only when they changed."""
        from tokencredit.bo import optimizer

        key = tuple((t.id, t.value, t.noise) for t in done)
        obs = optimizer.observations([self._vector(t) for t in done], [t.value for t in done],
                                     [t.noise for t in done], maximize=self.study.direction == "maximize")
        if key != self._model_key:
            self._model = optimizer.fit_model(obs, seed=_seed(self.study.seed, len(done)))
            self._model_key = key
        return self._model, obs


def _id(trial: TrialRef) -> int:
    return trial.id if isinstance(trial, Trial) else int(trial)


def _seed(seed: int, index: int) -> int:
    # Distinct, reproducible streams per step; kept below 2**31 for every RNG that reads it.
    return (int(seed) * 1_000_003 + int(index)) % (2**31 - 1)

