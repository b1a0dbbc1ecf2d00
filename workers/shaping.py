"""Shaping math (pure): attributions → per-token rewards that sum to the RM score R.

Additive shaping (the default). Every explained component k gives per-token values v_k[t] and a base b_k with

    Σ_t v_k[t] + b_k = R

(shap: the Shapley values of the masked game and b = f(∅); lime: its coefficients; loo: f(x) − f(x without t);
prefix: s_t − s_{t−1}; attention: R·a_t with Σa = 1, so b = 0; in every case b is computed as R − Σv, so the
estimator's floating-point residual and any precision difference between coalition rows and R land in b). The
component's rewards are

    r_k[t] = v_k[t] + b_k·u[t]

with u the residual placement (one-hot on the last token by default, or uniform), and the mix is r = Σ_k w_k r_k
(w on the simplex), so Σ_t r_t = R exactly. Every token other than the placement token receives Σ_k w_k v_k[t]:
its own attribution, in score units, with its own sign, whatever R and the other tokens' attributions are.
`sparse` is r = R on the last token (ordinary RLHF) and `attention` is ABC's R·a_t.

Why additive: the values are marginal contributions to the score, comparable across responses, and a token that
lowered the score is never rewarded for it. The previous scheme ("sign-aware-l1", e = sign(R)·φ/Σ|φ| + a residual
on the last token) rescales every φ by |R|/Σ|φ| and puts R·(1 − sign(R)Σφ/Σ|φ|) ∈ R·[0, 2] on the last token, which
gives a harmful last token the largest reward in about half of random cases and inflates noise-level attributions
to full scale (../shared/notes/reviews/fidelity.md §1). It is kept, by name, only for comparison.

The shaped return equals R for every response, so the expected-return objective (and its optimum) is unchanged.
The per-token rewards depend on tokens after t (the explanation sees the finished response), so this does not
make PPO's reward-to-go an unbiased gradient estimate: learning dynamics can change, as with ABC.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "NORMALIZATIONS",
    "RESIDUAL_PLACEMENTS",
    "TokenAttribution",
    "additive_rewards",
    "normalize_signed",
    "normalize_nonnegative",
    "sparse_distribution",
    "residual_distribution",
    "mix_rewards",
    "conserve",
    "step_spans",
    "token_steps",
    "step_rewards",
]

# Request field `normalization`: the default first.
NORMALIZATIONS = ("additive", "sign-aware-l1")
# Request field `residual_placement`: where a component's base b_k (and sparse's R) goes.
RESIDUAL_PLACEMENTS = ("last", "uniform")


@dataclass(frozen=True)
class TokenAttribution:
    """One component's explanation: a value per token and the base, with Σ values + base = R."""

    values: np.ndarray  # float64 [T]
    base: float

    @classmethod
    def of(cls, values, score: float) -> "TokenAttribution":
        """Values with the base that makes them add up to `score` (b = R − Σv, summed exactly)."""
        values = np.asarray(values, dtype=np.float64)
        if not np.all(np.isfinite(values)):
            raise ValueError("attributions must be finite")
        return cls(values=values, base=float(score) - math.fsum(values.tolist()))


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


def additive_rewards(attribution: TokenAttribution, placement: str = "last") -> np.ndarray:
    """r[t] = v[t] + b·u[t]: each token keeps its own attribution; the base goes to the placement."""
    u = residual_distribution(len(attribution.values), placement)
    return attribution.values + attribution.base * u


def normalize_signed(phi: np.ndarray, score: float, placement: str = "last") -> np.ndarray:
    """The "sign-aware-l1" comparison scheme: e = sign(R)·φ/Σ|φ| + (1 − sign(R)·Σφ/Σ|φ|)·u, Σ e = 1.

    Rewards are R·e. Kept only to compare against additive shaping (see the module docstring for its defects).
    """
    phi = np.asarray(phi, dtype=np.float64)
    u = residual_distribution(len(phi), placement)
    if not np.all(np.isfinite(phi)):
        raise ValueError("attributions must be finite")
    total_abs = float(np.abs(phi).sum())
    if total_abs == 0.0:
        return u
    s = -1.0 if score < 0 else 1.0
    e = s * phi / total_abs
    return e + (1.0 - float(e.sum())) * u


def normalize_nonnegative(weights: np.ndarray, placement: str = "last") -> np.ndarray:
    """For attention-like credits (≥ 0): w / Σw, or the residual placement when Σw = 0."""
    w = np.clip(np.asarray(weights, dtype=np.float64), 0.0, None)
    total = float(w.sum())
    if total == 0.0 or not np.isfinite(total):
        return residual_distribution(len(w), placement)
    return w / total


def conserve(rewards: np.ndarray, score: float) -> np.ndarray:
    """Put the floating-point residual of Σ rewards − score on the last token, so the sum is exact to rounding."""
    rewards = np.array(rewards, dtype=np.float64)
    rewards[-1] += score - math.fsum(rewards.tolist())
    return rewards


def mix_rewards(score: float, rewards: Mapping[str, np.ndarray], weights: Mapping[str, float]) -> np.ndarray:
    """r = Σ_k w_k r_k over the components with w_k > 0, where each r_k sums to `score`.

    Args:
        score: the RM score R.
        rewards: component name → per-token rewards over the same tokens (each sums to R).
        weights: component name → simplex weight (renormalised over the positive ones).

    Raises:
        KeyError: a weighted component has no rewards.
        ValueError: no positive weight, or components of different lengths.
    """
    active: Dict[str, float] = {k: float(v) for k, v in weights.items() if v > 0}
    if not active:
        raise ValueError("at least one weight must be positive")
    n = len(next(iter(rewards[k] for k in active)))
    mixed = np.zeros(n, dtype=np.float64)
    # Renormalise: weights accepted within the simplex tolerance must not leak mass.
    total_weight = sum(active.values())
    for name, w in active.items():
        r = np.asarray(rewards[name], dtype=np.float64)
        if len(r) != n:
            raise ValueError(f"component {name} has {len(r)} tokens, expected {n}")
        mixed += (w / total_weight) * r
    return conserve(mixed, score)


# ------------------------------------------------------------------------------------------------------------------
# Steps (request field `aggregate.steps`): one reward per step of the response, for PRM-style trainers. A step's
# reward is the sum of its tokens' rewards, so the steps sum to the score exactly as the tokens do.


def step_spans(response: str, *, separator: Optional[str] = None, pattern=None) -> List[Tuple[int, int]]:
    """Character spans [start, end) of the steps of `response`: a step ends after each occurrence of `separator`
    (or after each match of the compiled `pattern`, zero-width matches included); the rest is the last step. The
    spans cover the response in order without gaps, and none is empty.

    Example:
        >>> step_spans("a\\n\\nb\\n\\n", separator="\\n\\n")
        [(0, 3), (3, 6)]
    """
    if (separator is None) == (pattern is None):
        raise ValueError("give exactly one of separator and pattern")
    ends = set()
    if separator is not None:
        at = response.find(separator)
        while at >= 0:
            ends.add(at + len(separator))
            at = response.find(separator, at + len(separator))
    else:
        ends.update(m.end() for m in pattern.finditer(response))
    ends.add(len(response))
    bounds = [0] + sorted(e for e in ends if 0 < e <= len(response))
    return [(bounds[k], bounds[k + 1]) for k in range(len(bounds) - 1)]


def token_steps(token_spans: Sequence[Tuple[int, int]], steps: Sequence[Tuple[int, int]]) -> List[int]:
    """The step of each token: the step holding its first character; for a token with no characters (a special
    token, or a piece of a character that an earlier token carries) the step of the character before it, so it
    stays with the text it follows (the first step when nothing precedes it)."""
    starts = [s for s, _ in steps]
    out = []
    for start, end in token_spans:
        at = start if end > start else start - 1
        out.append(max(bisect.bisect_right(starts, max(at, 0)) - 1, 0))
    return out


def step_rewards(token_rewards: Sequence[float], token_spans: Sequence[Tuple[int, int]],
                 steps: Sequence[Tuple[int, int]]) -> List[Tuple[Tuple[int, int], Tuple[int, int], float]]:
    """(step span, [first, end) token range, Σ of its tokens' rewards) per step.

    Token spans are sorted, so each step's tokens are one contiguous range; a step that no token starts in gets an
    empty range at its place and reward 0. Σ step rewards = Σ token rewards (both summed with fsum).
    """
    if len(token_rewards) != len(token_spans):
        raise ValueError(f"{len(token_rewards)} rewards for {len(token_spans)} token spans")
    owner = token_steps(token_spans, steps)
    if any(b < a for a, b in zip(owner, owner[1:])):
        raise ValueError("token spans must be sorted")
    out = []
    first = 0
    for k, span in enumerate(steps):
        end = first
        while end < len(owner) and owner[end] == k:
            end += 1
        out.append((tuple(span), (first, end), math.fsum(float(r) for r in token_rewards[first:end])))
        first = end
    return out
