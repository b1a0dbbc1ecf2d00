"""The Bayesian-optimisation step over the simplex of shaping weights (botorch; imported only here).

Parametrisation. The K weights live on the simplex {w ≥ 0, Σw = 1}, a (K−1)-dimensional set, while botorch
optimises over boxes. We drop the last weight: x = (w_1, …, w_{K−1}) ∈ [0, 1]^{K−1} with the linear inequality
Σx ≤ 1, and w_K = 1 − Σx. This map is an affine bijection between the simplex and that polytope, so nothing is
lost or counted twice, and the constraint is passed to `optimize_acqf` as `inequality_constraints`
(botorch's form Σ c_i x_i ≥ r, here c = −1, r = −1). Candidates come back within float tolerance of the
polytope; `to_simplex` clips the last weight at 0 and renormalises, so the server's simplex check always holds.

Model. `SingleTaskGP` on x (Normalize input transform on the unit box, Standardize outcome), with the reported
noise as fixed noise when every observation reports one (`noise` is a standard deviation, squared to a
variance), else a learned homoskedastic noise; fitted with `fit_gpytorch_mll`. Values are negated for a
`minimize` study, so the GP always maximises.

Acquisition. `qLogNoisyExpectedImprovement` with `X_baseline` = the observed points (its noisy incumbent suits
objectives such as a short RL run) and `X_pending` = trials suggested but not observed yet, so that parallel
suggestions spread out instead of piling onto one point (failed trials are passed there too, so their exact
point is not proposed again).

Initial design. Scrambled Sobol points u ∈ [0, 1]^{K−1}, mapped onto the simplex by sorted spacings (the gaps
between 0, the sorted u_i and 1): for uniform u that is exactly the uniform distribution on the simplex, and
the Sobol sequence keeps the spread even. Point i of the seeded sequence is trial i's, so the design is the
same whatever order parallel trials finish in.

Every step seeds torch from (seed, trial id), so a study replays identically.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np
import torch

__all__ = ["to_free", "to_simplex", "sobol_point", "fit_model", "propose", "posterior_mean", "Observations"]

DTYPE = torch.double


def to_free(weights: np.ndarray) -> np.ndarray:
    """(n, K) simplex points → (n, K−1) free coordinates (drop the last weight)."""
    return np.asarray(weights, dtype=np.float64)[..., :-1]


def to_simplex(x: np.ndarray) -> np.ndarray:
    """(n, K−1) free coordinates → (n, K) simplex points; clipped and renormalised onto the simplex exactly."""
    x = np.clip(np.asarray(x, dtype=np.float64), 0.0, 1.0)
    w = np.concatenate([x, 1.0 - x.sum(axis=-1, keepdims=True)], axis=-1)
    w = np.clip(w, 0.0, None)
    return w / w.sum(axis=-1, keepdims=True)


def sobol_point(index: int, k: int, seed: int) -> np.ndarray:
    """Point `index` of the seeded scrambled Sobol design, as K simplex weights (sorted-spacings map)."""
    engine = torch.quasirandom.SobolEngine(dimension=k - 1, scramble=True, seed=seed)
    if index:
        engine.fast_forward(index)
    u = np.sort(engine.draw(1, dtype=DTYPE).numpy()[0])
    return np.diff(np.concatenate([[0.0], u, [1.0]]))


@dataclass
class Observations:
    """What the GP is fitted on, in free coordinates, already oriented for maximisation."""

    x: np.ndarray  # (n, K−1)
    y: np.ndarray  # (n,)
    noise_sd: Optional[np.ndarray] = None  # (n,) or None: infer the noise


def fit_model(obs: Observations, seed: int):
    """A fitted `SingleTaskGP` on the observations."""
    from botorch.exceptions.warnings import OptimizationWarning
    from botorch.fit import fit_gpytorch_mll
    from botorch.models import SingleTaskGP
    from botorch.models.transforms.input import Normalize
    from botorch.models.transforms.outcome import Standardize
    from gpytorch.mlls import ExactMarginalLogLikelihood

    torch.manual_seed(seed)
    d = obs.x.shape[1]
    X = torch.as_tensor(obs.x, dtype=DTYPE)
    Y = torch.as_tensor(obs.y, dtype=DTYPE).unsqueeze(-1)
    Yvar = None
    if obs.noise_sd is not None:
        # A floor keeps the kernel matrix well conditioned when an objective reports noise 0.
        Yvar = torch.as_tensor(np.maximum(obs.noise_sd, 1e-6) ** 2, dtype=DTYPE).unsqueeze(-1)
    bounds = torch.stack([torch.zeros(d, dtype=DTYPE), torch.ones(d, dtype=DTYPE)])
    model = SingleTaskGP(X, Y, train_Yvar=Yvar, input_transform=Normalize(d=d, bounds=bounds),
                         outcome_transform=Standardize(m=1))
    mll = ExactMarginalLogLikelihood(model.likelihood, model)
    with warnings.catch_warnings():
        # A fit that stops at its iteration limit is still a usable model; botorch says so loudly.
        warnings.simplefilter("ignore", category=OptimizationWarning)
        fit_gpytorch_mll(mll)
    model.eval()
    return model


def posterior_mean(model, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model.posterior(torch.as_tensor(x, dtype=DTYPE)).mean.squeeze(-1).numpy()


def propose(model, obs: Observations, pending_x: Sequence[np.ndarray], seed: int, *,
            num_restarts: int = 4, raw_samples: int = 128, mc_samples: int = 128) -> np.ndarray:
    """The next point (K simplex weights) maximising qLogNEI over the simplex, given the pending points."""
    from botorch.acquisition.logei import qLogNoisyExpectedImprovement
    from botorch.exceptions.warnings import OptimizationWarning
    from botorch.optim import optimize_acqf
    from botorch.sampling.normal import SobolQMCNormalSampler

    torch.manual_seed(seed)
    d = obs.x.shape[1]
    X_pending = torch.as_tensor(np.stack(list(pending_x)), dtype=DTYPE) if len(pending_x) else None
    acq = qLogNoisyExpectedImprovement(
        model=model,
        X_baseline=torch.as_tensor(obs.x, dtype=DTYPE),
        sampler=SobolQMCNormalSampler(sample_shape=torch.Size([mc_samples]), seed=seed),
        X_pending=X_pending,
        prune_baseline=True,
    )
    bounds = torch.stack([torch.zeros(d, dtype=DTYPE), torch.ones(d, dtype=DTYPE)])
    simplex = [(torch.arange(d), -torch.ones(d, dtype=DTYPE), -1.0)]  # −Σx ≥ −1, i.e. w_K = 1 − Σx ≥ 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=OptimizationWarning)
        candidate, _ = optimize_acqf(acq, bounds=bounds, q=1, num_restarts=num_restarts, raw_samples=raw_samples,
                                     inequality_constraints=simplex, options={"batch_limit": num_restarts, "maxiter": 200})
    return to_simplex(candidate.detach().numpy())[0]


def observations(weights: List[np.ndarray], values: List[float], noises: List[Optional[float]],
                 maximize: bool) -> Observations:
    sign = 1.0 if maximize else -1.0
    noise = np.asarray(noises, dtype=np.float64) if noises and all(n is not None for n in noises) else None
    return Observations(x=to_free(np.stack(weights)), y=sign * np.asarray(values, dtype=np.float64), noise_sd=noise)
