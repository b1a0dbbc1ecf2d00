"""Explainers: turn a set function f(mask) into one attribution per response token.

Each explainer is a pure function of a value function `value_fn(masks: bool[N, T]) -> float64[N]` (the coalition
evaluator bound to one input), the number of tokens and its budget. They never see text or torch: the shap and
lime libraries are driven on token-position masks, so every row is an id-replacement of the same sequence.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

__all__ = [
    "Attribution",
    "ValueFn",
    "BudgetError",
    "default_shap_rows",
    "default_lime_samples",
    "min_shap_rows",
    "explain_shap",
    "explain_lime",
    "explain_loo",
    "exact_shapley",
    "enumeration_rows",
    "permutation_shapley",
    "stratified_passes",
    "stratified_rows",
]

ValueFn = Callable[[np.ndarray], np.ndarray]


class BudgetError(ValueError):
    """The budget is below what the estimator needs for this many tokens."""

    def __init__(self, message: str, minimum: int):
        super().__init__(message)
        self.minimum = minimum


@dataclass
class Attribution:
    """Per-token attributions with their reference values.

    For efficient estimators (shap, loo is not) `values.sum() == full_value - base_value`.
    """

    values: np.ndarray  # float64 [T]
    base_value: float  # f(all response tokens masked), or LIME's intercept
    full_value: float  # f(x)
    rows: int  # rows the estimator asked for (before the evaluator's de-duplication)
    # True when the values are exact Shapley values (every coalition enumerated), not a sample estimate.
    exact: bool = False
    # Stratified permutation only: each pass's own estimate, float64 [P, T] (values is their mean); the credit
    # head learns a one-pass estimate's correction from them (workers/credit_head.py, split_passes).
    passes: Optional[np.ndarray] = None


def default_shap_rows(n_tokens: int) -> int:
    """8 rows per token: four stratified antithetic passes (8T − 6 rows; three for shap's PermutationExplainer,
    which repeats the empty and full rows). Chosen from the bench: Spearman ≥ 0.95 on the demo RM needs 4."""
    return max(8 * n_tokens, 2 * n_tokens + 1)


def enumeration_rows(n_tokens: int) -> int:
    """Rows of exact Shapley values by enumeration: every one of the 2^T coalitions once."""
    return 1 << n_tokens


def min_shap_rows(n_tokens: int, estimator: str, exact_when_affordable: bool = True) -> int:
    # Kernel needs more coalitions than players; one antithetic pass is 2T + 1 rows in shap's Permutation and
    # 2T in ours (the full coalition is not evaluated twice). A budget that covers every coalition always works:
    # it enumerates them instead (exact).
    if estimator == "kernel":
        sampled = n_tokens + 2
    else:
        sampled = 2 * n_tokens if estimator == "stratified" else 2 * n_tokens + 1
    if not exact_when_affordable or n_tokens >= 62:
        return sampled
    return min(sampled, enumeration_rows(n_tokens))


def default_lime_samples(n_tokens: int) -> int:
    return max(64, 8 * n_tokens)


@contextlib.contextmanager
def _global_numpy_rng_restored():
    state = np.random.get_state()
    try:
        yield
    finally:
        np.random.set_state(state)


def _counting(value_fn: ValueFn):
    rows = [0]

    def f(x: np.ndarray) -> np.ndarray:
        masks = np.asarray(x) > 0.5
        rows[0] += len(masks)
        return value_fn(masks)

    return f, rows


def explain_shap(
    value_fn: ValueFn,
    n_tokens: int,
    *,
    estimator: str = "stratified",
    max_rows: Optional[int] = None,
    seed: int = 0,
    exact_when_affordable: bool = True,
) -> Attribution:
    """Shapley values, with "token absent" = replaced by the mask id.

    Stratified (default): `permutation_shapley`, our antithetic passes with stratified positions.
    Permutation (shap library): antithetic permutations (forward then reverse), 2T+1 rows each, exact efficiency
    by telescoping.
    Kernel: weighted least squares with the efficiency constraint, `l1_reg=False` (no feature selection).
    Whatever the estimator, a budget of at least 2^T rows enumerates every coalition instead (`exact_shapley`):
    exact values for no more rows than the budget (`exact_when_affordable=False` runs the sampler anyway, to
    measure it).

    Raises:
        BudgetError: max_rows below the estimator's minimum for n_tokens.
    """
    if estimator not in ("stratified", "permutation", "kernel"):
        raise ValueError(f"unknown shap estimator {estimator!r}; use 'permutation', 'kernel' or 'stratified'")
    budget = default_shap_rows(n_tokens) if max_rows is None else int(max_rows)
    if exact_when_affordable and n_tokens < 62 and enumeration_rows(n_tokens) <= budget:
        return exact_shapley(value_fn, n_tokens)
    if estimator == "stratified":
        return permutation_shapley(value_fn, n_tokens, max_rows=max_rows, seed=seed)
    import shap

    minimum = min_shap_rows(n_tokens, estimator, exact_when_affordable=False)
    if budget < minimum:
        raise BudgetError(f"{estimator} SHAP on {n_tokens} tokens needs max_rows >= {minimum}, got {budget}", minimum)
    f, rows = _counting(value_fn)
    x = np.ones((1, n_tokens))
    background = np.zeros((1, n_tokens))
    # shap's estimators draw from numpy's process-wide RNG (they seed it): restore it afterwards, so that an
    # explanation never changes the randomness of anything else in the process.
    with _global_numpy_rng_restored():
        if estimator == "permutation":
            masker = shap.maskers.Independent(background, max_samples=1)
            explainer = shap.PermutationExplainer(f, masker, seed=seed)
            explanation = explainer(x, max_evals=budget, batch_size=2 * n_tokens + 1, silent=True)
            values = np.asarray(explanation.values[0], dtype=np.float64)
            base = float(np.asarray(explanation.base_values).reshape(-1)[0])
            full = base + float(values.sum())
        else:
            np.random.seed(seed)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                explainer = shap.KernelExplainer(f, background, silent=True)
                values = np.asarray(explainer.shap_values(x, nsamples=budget, l1_reg=False, silent=True), dtype=np.float64)
            values = values.reshape(-1)[:n_tokens]
            base = float(np.asarray(explainer.expected_value).reshape(-1)[0])
            full = float(f(x)[0])
    return Attribution(values=values, base_value=base, full_value=full, rows=rows[0])


def exact_shapley(value_fn: ValueFn, n_tokens: int) -> Attribution:
    """Shapley values by enumerating all 2^T coalitions in one evaluator call:

        φ_i = Σ_{S ∌ i} |S|! (T − |S| − 1)! / T! · (f(S ∪ {i}) − f(S))

    Coalition S is row `code` with bit t set when token t is kept, so S ∪ {i} is row `code | 1 << i`.
    Efficiency Σφ = f(x) − f(∅) holds to float64 rounding.
    """
    T = n_tokens
    if T < 1 or T >= 62:
        raise ValueError(f"exact Shapley values need 1 <= T < 62 tokens, got {T}")
    codes = np.arange(enumeration_rows(T), dtype=np.int64)
    masks = ((codes[:, None] >> np.arange(T)) & 1).astype(bool)
    values = np.asarray(value_fn(masks), dtype=np.float64)
    sizes = masks.sum(axis=1)
    # Weight of a coalition of size s not containing i: s!(T−s−1)!/T! = 1 / (T · C(T−1, s)).
    weight = np.array([1.0 / (T * math.comb(T - 1, s)) for s in range(T)])
    phi = np.empty(T, dtype=np.float64)
    for i in range(T):
        without = codes[((codes >> i) & 1) == 0]
        phi[i] = float(np.dot(weight[sizes[without]], values[without | (1 << i)] - values[without]))
    return Attribution(values=phi, base_value=float(values[0]), full_value=float(values[-1]), rows=len(codes), exact=True)


def stratified_rows(n_tokens: int, passes: int) -> int:
    """Rows of `passes` stratified passes: the empty and full coalitions once, then T − 1 forward and T − 1
    backward interior rows per pass (4 passes = 8T − 6 rows)."""
    return 2 + 2 * passes * (n_tokens - 1)


def stratified_passes(n_tokens: int, budget: int) -> int:
    """The most stratified passes whose rows fit in `budget` (at least one)."""
    return max(1, (int(budget) - 2) // max(1, 2 * (n_tokens - 1)))


def permutation_shapley(
    value_fn: ValueFn,
    n_tokens: int,
    *,
    max_rows: Optional[int] = None,
    seed: int = 0,
) -> Attribution:
    """Antithetic permutation sampling with stratified positions, all passes in one evaluator call.

    Each pass walks a permutation forward (adding tokens) and back (removing them), with exact efficiency by
    telescoping; antithetic pairs make every pass exact for games with at most pairwise interactions. Pass p
    shifts one random ordering cyclically by p·T/P positions (a fresh ordering per T passes), so every token
    visits every coalition-size stratum evenly across the P passes instead of at random; each pass is still a uniformly random permutation
    (unbiased). Marginal contributions depend on where a token sits (early: little context, late: much), so
    spreading positions lowers the variance: on the demo RM, 3 stratified passes matched 4 independent ones
    (bench/RESULTS.md). The empty and full coalitions are evaluated once, not once per pass.
    """
    T = n_tokens
    budget = default_shap_rows(T) if max_rows is None else int(max_rows)
    minimum = 2 * T  # one forward-and-back pass (called directly, without the enumeration shortcut)
    if budget < minimum:
        raise BudgetError(f"permutation SHAP on {T} tokens needs max_rows >= {minimum}, got {budget}", minimum)
    passes = stratified_passes(T, budget)
    rng = np.random.default_rng(seed)
    # At most T distinct cyclic shifts exist: beyond T passes, each group of ≤ T passes gets a fresh ordering.
    groups = np.array_split(np.arange(passes), -(-passes // T))
    orders = []
    for group in groups:
        base = rng.permutation(T)
        orders += [np.roll(base, (j * T) // len(group)) for j in range(len(group))]
    # Rows: [empty, full] then per pass the T − 1 interior forward rows (keep order[:k]) and the T − 1 interior
    # backward rows (keep order[k:]), k = 1..T−1.
    interior = np.arange(1, T)
    masks = [np.zeros((1, T), dtype=bool), np.ones((1, T), dtype=bool)]
    for order in orders:
        rank = np.empty(T, dtype=np.int64)
        rank[order] = np.arange(T)
        masks.append(rank[None, :] < interior[:, None])
        masks.append(rank[None, :] >= interior[:, None])
    values = value_fn(np.concatenate(masks))
    empty, full = float(values[0]), float(values[1])
    per_pass = values[2:].reshape(passes, 2, T - 1)
    each = np.zeros((passes, T), dtype=np.float64)
    for p, order in enumerate(orders):
        forward = np.concatenate([[empty], per_pass[p, 0], [full]])  # row k keeps order[:k]
        backward = np.concatenate([[full], per_pass[p, 1], [empty]])  # row k keeps order[k:]
        each[p, order] += np.diff(forward)  # adding order[k] moves forward row k → k+1
        each[p, order] -= np.diff(backward)  # removing order[k] moves backward row k → k+1
    each /= 2
    phi = each.sum(axis=0) / passes
    return Attribution(values=phi, base_value=empty, full_value=full, rows=stratified_rows(T, passes), passes=each)


def explain_lime(
    value_fn: ValueFn,
    n_tokens: int,
    *,
    num_samples: Optional[int] = None,
    seed: int = 0,
    kernel_width: float = 25.0,
) -> Attribution:
    """LIME coefficients at token level: the lime library with `bow=False`, one feature per response position.

    Each position becomes a distinct word ("t0 t1 ..."), so LIME's positional masking (`bow=False`) removes exactly
    one RM token per feature; the classifier function maps strings back to masks. All features are kept.
    """
    from lime.lime_text import LimeTextExplainer

    samples = default_lime_samples(n_tokens) if num_samples is None else int(num_samples)
    mask_word = "MASKED"
    words = [f"t{i}" for i in range(n_tokens)]
    text = " ".join(words)
    f, rows = _counting(value_fn)

    def classifier(texts):
        masks = np.array([[w != mask_word for w in t.split(" ")] for t in texts], dtype=np.float64)
        return f(masks)[:, None]

    explainer = LimeTextExplainer(
        kernel_width=kernel_width,
        bow=False,
        split_expression=r"\s",
        mask_string=mask_word,
        feature_selection="none",
        random_state=seed,
    )
    exp = explainer.explain_instance(text, classifier, labels=(0,), num_features=n_tokens, num_samples=samples)
    values = np.zeros(n_tokens, dtype=np.float64)
    for position, weight in exp.local_exp[0]:
        values[int(position)] = float(weight)
    full = float(value_fn(np.ones((1, n_tokens), dtype=bool))[0])
    return Attribution(values=values, base_value=float(exp.intercept[0]), full_value=full, rows=rows[0] + 1)


def explain_loo(value_fn: ValueFn, n_tokens: int) -> Attribution:
    """Leave-one-out: φ_t = f(x) − f(x without t), T + 1 rows in one batch (the empty coalition too, for the
    base value, when T > 1; it is the same row as "x without t" when T = 1). Not efficient under interactions."""
    masks = np.ones((n_tokens + 2, n_tokens), dtype=bool)
    masks[np.arange(1, n_tokens + 1), np.arange(n_tokens)] = False
    masks[-1] = False
    scores = value_fn(masks)
    full = float(scores[0])
    return Attribution(values=full - scores[1:-1], base_value=float(scores[-1]), full_value=full, rows=n_tokens + 2)
