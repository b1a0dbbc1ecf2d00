"""Explainers: turn a set function f(mask) into one attribution per response token.

Each explainer is a pure function of a value function `value_fn(masks: bool[N, T]) -> float64[N]` (the coalition
evaluator bound to one input), the number of tokens and its budget. They never see text or torch: the shap and
lime libraries are driven on token-position masks, so every row is an id-replacement of the same sequence.
"""

from __future__ import annotations

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
    "permutation_shapley",
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


def default_shap_rows(n_tokens: int) -> int:
    """8 rows per token: three antithetic permutation passes for Permutation SHAP (attribution-cost.md §6)."""
    return max(8 * n_tokens, 2 * n_tokens + 1)


def min_shap_rows(n_tokens: int, estimator: str) -> int:
    # Permutation needs one forward-and-back pass (2T + 1 rows); Kernel needs more coalitions than players.
    return n_tokens + 2 if estimator == "kernel" else 2 * n_tokens + 1


def default_lime_samples(n_tokens: int) -> int:
    return max(64, 8 * n_tokens)


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
    estimator: str = "permutation",
    max_rows: Optional[int] = None,
    seed: int = 0,
) -> Attribution:
    """Shapley values by the shap library, with "token absent" = replaced by the mask id.

    Permutation: antithetic permutations (forward then reverse), 2T+1 rows each, exact efficiency by telescoping.
    Kernel: weighted least squares with the efficiency constraint, `l1_reg=False` (no feature selection); it
    enumerates every coalition when the budget allows, which makes it exact for small T.

    Raises:
        BudgetError: max_rows below the estimator's minimum for n_tokens.
    """
    if estimator == "stratified":
        return permutation_shapley(value_fn, n_tokens, max_rows=max_rows, seed=seed)
    import shap

    budget = default_shap_rows(n_tokens) if max_rows is None else int(max_rows)
    minimum = min_shap_rows(n_tokens, estimator)
    if budget < minimum:
        raise BudgetError(f"{estimator} SHAP on {n_tokens} tokens needs max_rows >= {minimum}, got {budget}", minimum)
    f, rows = _counting(value_fn)
    x = np.ones((1, n_tokens))
    background = np.zeros((1, n_tokens))
    if estimator == "permutation":
        masker = shap.maskers.Independent(background, max_samples=1)
        # shap seeds numpy's global RNG here; the engine runs one request at a time per process, so it is safe.
        explainer = shap.PermutationExplainer(f, masker, seed=seed)
        explanation = explainer(x, max_evals=budget, batch_size=2 * n_tokens + 1, silent=True)
        values = np.asarray(explanation.values[0], dtype=np.float64)
        base = float(np.asarray(explanation.base_values).reshape(-1)[0])
        full = base + float(values.sum())
    elif estimator == "kernel":
        np.random.seed(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            explainer = shap.KernelExplainer(f, background, silent=True)
            values = np.asarray(explainer.shap_values(x, nsamples=budget, l1_reg=False, silent=True), dtype=np.float64)
        values = values.reshape(-1)[:n_tokens]
        base = float(np.asarray(explainer.expected_value).reshape(-1)[0])
        full = float(f(x)[0])
    else:
        raise ValueError(f"unknown shap estimator {estimator!r}; use 'permutation', 'kernel' or 'stratified'")
    return Attribution(values=values, base_value=base, full_value=full, rows=rows[0])


def permutation_shapley(
    value_fn: ValueFn,
    n_tokens: int,
    *,
    max_rows: Optional[int] = None,
    seed: int = 0,
) -> Attribution:
    """Antithetic permutation sampling with stratified positions, all passes in one evaluator call.

    Each pass walks a permutation forward (adding tokens) and back (removing them): 2T+1 rows, exact efficiency
    by telescoping. Pass p shifts one random ordering cyclically by p·T/P positions, so every
    token visits every coalition-size stratum evenly across the P passes instead of at random; each pass is still
    a uniformly random permutation (unbiased), but the strata no longer cluster. Marginal contributions depend on
    where a token sits (early: little context, late: much), so spreading positions is what lowers the variance.
    """
    budget = default_shap_rows(n_tokens) if max_rows is None else int(max_rows)
    per_pass = 2 * n_tokens + 1
    if budget < per_pass:
        raise BudgetError(f"permutation SHAP on {n_tokens} tokens needs max_rows >= {per_pass}, got {budget}", per_pass)
    passes = budget // per_pass
    rng = np.random.default_rng(seed)
    base = rng.permutation(n_tokens)
    orders = [np.roll(base, (p * n_tokens) // passes) for p in range(passes)]
    # Row k of a pass: forward rows keep order[:k]; backward rows keep order[k:] — both from the same order.
    steps = np.arange(n_tokens + 1)
    masks = np.zeros((passes, 2 * n_tokens + 1, n_tokens), dtype=bool)
    for p, order in enumerate(orders):
        rank = np.empty(n_tokens, dtype=np.int64)
        rank[order] = np.arange(n_tokens)
        masks[p, : n_tokens + 1] = rank[None, :] < steps[:, None]
        masks[p, n_tokens + 1 :] = rank[None, :] >= steps[1:, None]
    values = value_fn(masks.reshape(-1, n_tokens)).reshape(passes, 2 * n_tokens + 1)
    forward = values[:, : n_tokens + 1]
    backward = np.concatenate([forward[:, -1:], values[:, n_tokens + 1 :]], axis=1)  # full, then removals
    phi = np.zeros(n_tokens, dtype=np.float64)
    for p, order in enumerate(orders):
        phi[order] += np.diff(forward[p])  # adding order[k] moves row k → k+1
        phi[order] += -np.diff(backward[p])  # removing order[k] moves backward row k → k+1
    phi /= 2 * passes
    full, base_value = float(forward[0, -1]), float(forward[0, 0])
    return Attribution(values=phi, base_value=base_value, full_value=full, rows=passes * per_pass)


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
    """Leave-one-out: φ_t = f(x) − f(x without t), T + 1 rows in one batch. Not efficient under interactions."""
    masks = np.ones((n_tokens + 1, n_tokens), dtype=bool)
    masks[np.arange(1, n_tokens + 1), np.arange(n_tokens)] = False
    scores = value_fn(masks)
    full = float(scores[0])
    base = float(value_fn(np.zeros((1, n_tokens), dtype=bool))[0])
    return Attribution(values=full - scores[1:], base_value=base, full_value=full, rows=n_tokens + 2)
