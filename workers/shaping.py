"""Shaping math (pure): attributions → distributions e_k → per-token rewards r_t = R · Σ_k w_k e_k[t].

Every e_k sums to 1 over the response tokens and w lies on the simplex, so Σ_t r_t = R exactly: the shaped
return equals the RM score and the optimal policy is unchanged (Koo et al. 2025, r' = Wᵀ𝓔·r).

Normalization of signed attributions ("sign-aware L1", the documented default):

    S   = Σ_t |φ_t|
    e_t = s·φ_t / S + (1 − s·Σ_t φ_t / S) · u_t,      s = sign(R) (s = 1 when R = 0)

where u is the residual placement (one-hot on the last token, the ABC convention; or uniform). Properties:
  * Σ_t e_t = 1 for any φ (the residual term absorbs what the attributions do not explain).
  * Stable when Σφ ≈ 0: it divides by Σ|φ|, which vanishes only when every φ_t does (then e = u).
  * Sign-correct: R·e_t = |R|·φ_t/S + residual, so a token that pushed the score up always gets more reward
    than one that pushed it down, whatever the sign of R (plain φ/Σφ flips signs when Σφ < 0, and |φ|/Σ|φ|
    rewards harmful tokens).
  * When φ are same-signed Shapley values with Σφ = R (base value 0), r_t = φ_t exactly.
"""

from __future__ import annotations

from typing import Dict, Mapping

import numpy as np

__all__ = [
    "NORMALIZATION",
    "normalize_signed",
    "normalize_nonnegative",
    "sparse_distribution",
    "residual_distribution",
    "mix",
    "conserve",
]

NORMALIZATION = "sign-aware-l1 (e = sign(R)·φ/Σ|φ| + residual on the last token)"

# Below this share of the largest attribution scale, Σ|φ| is treated as zero (all-zero attributions).
_ZERO = 1e-300


def residual_distribution(n: int, placement: str = "last") -> np.ndarray:
    if n <= 0:
        raise ValueError("a distribution needs at least one token")
    if placement == "last":
        return sparse_distribution(n)
    if placement == "uniform":
        return np.full(n, 1.0 / n)
    raise ValueError(f"residual placement must be 'last' or 'uniform', got {placement!r}")


def sparse_distribution(n: int) -> np.ndarray:
    """All mass on the last token: ordinary RLHF."""
    e = np.zeros(n, dtype=np.float64)
    e[-1] = 1.0
    return e


def normalize_signed(phi: np.ndarray, score: float, placement: str = "last") -> np.ndarray:
    """Sign-aware L1 normalization of signed attributions (see the module docstring). Σ result = 1."""
    phi = np.asarray(phi, dtype=np.float64)
    n = len(phi)
    u = residual_distribution(n, placement)
    if not np.all(np.isfinite(phi)):
        raise ValueError("attributions must be finite")
    total_abs = float(np.abs(phi).sum())
    if total_abs <= _ZERO:
        return u
    s = -1.0 if score < 0 else 1.0
    e = s * phi / total_abs
    return e + (1.0 - float(e.sum())) * u


def normalize_nonnegative(weights: np.ndarray, placement: str = "last") -> np.ndarray:
    """For attention-like credits (≥ 0): w / Σw, or the residual placement when Σw = 0."""
    w = np.clip(np.asarray(weights, dtype=np.float64), 0.0, None)
    total = float(w.sum())
    if total <= _ZERO or not np.isfinite(total):
        return residual_distribution(len(w), placement)
    return w / total


def conserve(rewards: np.ndarray, score: float) -> np.ndarray:
    """Put the floating-point residual of Σ rewards − score on the last token, so the sum is exact to rounding."""
    rewards = np.array(rewards, dtype=np.float64)
    rewards[-1] += score - float(rewards.sum())
    return rewards


def mix(score: float, distributions: Mapping[str, np.ndarray], weights: Mapping[str, float]) -> np.ndarray:
    """r = R · Σ_k w_k e_k over the components with w_k > 0.

    Args:
        score: the RM score R.
        distributions: component name → distribution over the same tokens (each sums to 1).
        weights: component name → simplex weight.

    Raises:
        KeyError: a weighted component has no distribution.
    """
    active: Dict[str, float] = {k: float(v) for k, v in weights.items() if v > 0}
    if not active:
        raise ValueError("at least one weight must be positive")
    n = len(next(iter(distributions[k] for k in active)))
    mixed = np.zeros(n, dtype=np.float64)
    # Renormalise: weights accepted within the simplex tolerance must not leak mass.
    total_weight = sum(active.values())
    for name, w in active.items():
        w = w / total_weight
        e = np.asarray(distributions[name], dtype=np.float64)
        if len(e) != n:
            raise ValueError(f"component {name} has {len(e)} tokens, expected {n}")
        mixed += w * e
    return conserve(score * mixed, score)
