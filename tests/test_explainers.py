"""Explainers on a real (tiny, random, strongly interactive) transformer RM: SHAP efficiency, exact Shapley
agreement by enumeration, LOO by definition, LIME determinism, budgets."""

import itertools
import math

import numpy as np
import pytest

from workers.evaluator import CoalitionEvaluator, RowCounter
from workers.explainers import BudgetError, explain_lime, explain_loo, explain_shap

PROMPT = "Tell me about your weekend."
SHORT = "It was great!"  # ≤ 8 RM tokens: small enough to enumerate all coalitions
LONG = "The movie was wonderful and the acting was superb, I loved every minute of it."


def _value_fn(rm, response, counter=None):
    evaluator = CoalitionEvaluator(rm)
    inp = rm.encode(PROMPT, response)
    return (lambda masks: evaluator(inp, masks, counter)), inp


def exact_shapley(value_fn, n):
    """Shapley values by enumerating all 2^n coalitions (one batched evaluation)."""
    masks = np.array(list(itertools.product([False, True], repeat=n)), dtype=bool)
    values = dict(zip(map(tuple, masks), value_fn(masks)))
    phi = np.zeros(n)
    for mask in masks:
        size = int(mask.sum())
        for i in np.flatnonzero(~mask):
            with_i = mask.copy()
            with_i[i] = True
            weight = math.factorial(size) * math.factorial(n - size - 1) / math.factorial(n)
            phi[i] += weight * (values[tuple(with_i)] - values[tuple(mask)])
    return phi


@pytest.fixture(scope="module", params=["encoder", "causal"])
def rm(request, encoder_rm, causal_rm):
    return encoder_rm if request.param == "encoder" else causal_rm


@pytest.mark.parametrize("estimator", ["permutation", "kernel", "stratified"])
def test_shap_efficiency(rm, estimator):
    value_fn, inp = _value_fn(rm, LONG)
    n = inp.n_tokens
    att = explain_shap(value_fn, n, estimator=estimator, seed=3)
    full = value_fn(np.ones((1, n), bool))[0]
    empty = value_fn(np.zeros((1, n), bool))[0]
    # The explainer evaluates f(x) and f(∅) inside a batch of rows, these lines alone: other GEMM shapes (a lone row
    # is an M=1 product in the last layer, which rows compute at the score position only), so fp32 rounding may
    # differ by ~10 ulp (1.2e-6 measured on 0.906); 1e-5 still catches a wrong or shifted row (≥ 1e-3 here).
    assert att.full_value == pytest.approx(full, abs=1e-5 * max(1.0, abs(full)))
    assert att.base_value == pytest.approx(empty, abs=1e-5 * max(1.0, abs(empty)))
    # Efficiency Σφ = f(x) − f(∅) on the rows the estimator evaluated: exact by telescoping (permutation) or by
    # constraint (kernel); rounding only. (Those f(x), f(∅) agree with lone evaluations to 1e-5 above.)
    spread = att.full_value - att.base_value
    assert att.values.sum() == pytest.approx(spread, abs=1e-6 * max(1.0, abs(spread)))
    assert spread == pytest.approx(full - empty, abs=2e-5 * max(1.0, abs(full - empty)))


def test_shap_agrees_with_exact_shapley_values(rm, llama_chat_rm):
    # The causal case is a chat-template RM, read at its never-masked end-of-turn text. The plain-text GPT-2 is read
    # at its last kept token (what its own head reads), and on this random model which token is read dominates the
    # game: 40 passes leave ~20 % Monte-Carlo error there (tests/test_causal_masking.py covers that layout).
    rm = llama_chat_rm if rm.kind == "causal" else rm
    value_fn, inp = _value_fn(rm, SHORT)
    n = inp.n_tokens
    assert 3 <= n <= 8
    exact = exact_shapley(value_fn, n)
    scale = np.abs(exact).max()
    # Kernel SHAP with a budget ≥ 2^n enumerates every coalition: it solves for the exact values. Its rows come in
    # other batches than the enumeration's (f(x) alone), so fp32 rounding differs by up to ~2e-6 of the scale
    # (measured 7e-7 / 0.31); 1e-5 of the scale still fails any estimator error (≥ 1e-3 of it).
    kernel = explain_shap(value_fn, n, estimator="kernel", max_rows=2**n, seed=0, exact_when_affordable=False).values
    assert np.abs(kernel - exact).max() <= 1e-5 * scale
    # Permutation SHAP is a Monte-Carlo estimate: with 40 antithetic passes its max error was ≤ 1.7 % of the
    # largest value over 5 seeds on both tiny RMs (0.8-0.4 % at 100 passes); 5 % is 3× that, far below what a
    # wrong estimator gives (errors of the order of the values themselves).
    perm = explain_shap(value_fn, n, estimator="permutation", max_rows=40 * (2 * n + 1), seed=0, exact_when_affordable=False).values
    assert np.abs(perm - exact).max() <= 0.05 * scale
    assert np.corrcoef(perm, exact)[0, 1] > 0.95
    strat = explain_shap(value_fn, n, estimator="stratified", max_rows=40 * (2 * n + 1), seed=0, exact_when_affordable=False).values
    assert np.abs(strat - exact).max() <= 0.05 * scale


def test_stratified_permutation_sampling_is_unbiased():
    # A cubic game with strong interactions, exact Shapley values by enumeration; the mean of many independent
    # 2-pass estimates must converge to them (stratification may cut variance, never add bias).
    rng = np.random.default_rng(0)
    n = 6
    w, pair, triple = rng.normal(size=n), rng.normal(size=(n, n)), rng.normal(size=(n, n, n))

    def game(masks):
        m = masks.astype(float)
        return m @ w + np.einsum("ni,ij,nj->n", m, pair, m) + np.einsum("ni,nj,nk,ijk->n", m, m, m, triple)

    exact = exact_shapley(game, n)
    estimates = np.array([explain_shap(game, n, estimator="stratified", max_rows=2 * (2 * n + 1), seed=s,
                                       exact_when_affordable=False).values for s in range(400)])
    standard_error = estimates.std(axis=0) / np.sqrt(len(estimates))
    assert np.all(np.abs(estimates.mean(axis=0) - exact) <= 4.5 * standard_error + 1e-9)


def test_shap_is_deterministic_for_a_seed_and_varies_across_seeds(encoder_rm):
    value_fn, inp = _value_fn(encoder_rm, LONG)
    a = explain_shap(value_fn, inp.n_tokens, seed=1).values
    b = explain_shap(value_fn, inp.n_tokens, seed=1).values
    c = explain_shap(value_fn, inp.n_tokens, seed=2).values
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_shap_budget_below_minimum_is_refused(encoder_rm):
    value_fn, inp = _value_fn(encoder_rm, LONG)
    with pytest.raises(BudgetError) as info:
        explain_shap(value_fn, inp.n_tokens, max_rows=2 * inp.n_tokens - 1)
    assert info.value.minimum == 2 * inp.n_tokens  # stratified (default): the full row is not evaluated twice
    with pytest.raises(BudgetError) as info:
        explain_shap(value_fn, inp.n_tokens, estimator="permutation", max_rows=2 * inp.n_tokens)
    assert info.value.minimum == 2 * inp.n_tokens + 1


def test_shap_rows_respect_the_budget(encoder_rm):
    counter = RowCounter()
    value_fn, inp = _value_fn(encoder_rm, LONG, counter)
    budget = 5 * (2 * inp.n_tokens + 1)
    att = explain_shap(value_fn, inp.n_tokens, max_rows=budget)
    assert att.rows <= budget
    # The evaluator de-duplicates: every pass repeats the empty and full coalitions.
    assert counter.rows < counter.requested


def test_loo_is_leave_one_out_by_definition(rm):
    value_fn, inp = _value_fn(rm, LONG)
    n = inp.n_tokens
    att = explain_loo(value_fn, n)
    full = value_fn(np.ones((1, n), bool))[0]
    for t in (0, n // 2, n - 1):
        mask = np.ones((1, n), bool)
        mask[0, t] = False
        # fp32 kernels sum in a batch-shape-dependent order: a row alone and inside a batch differ by ~1e-7.
        assert att.values[t] == pytest.approx(full - value_fn(mask)[0], abs=1e-5)


def test_lime_is_deterministic_and_tracks_the_model(encoder_rm):
    value_fn, inp = _value_fn(encoder_rm, SHORT)
    n = inp.n_tokens
    a = explain_lime(value_fn, n, num_samples=400, seed=5)
    b = explain_lime(value_fn, n, num_samples=400, seed=5)
    assert np.array_equal(a.values, b.values)
    assert a.rows == 401
    # LIME fits a local linear surrogate: on a small response it must correlate with the exact Shapley values.
    exact = exact_shapley(value_fn, n)
    assert np.corrcoef(a.values, exact)[0, 1] > 0.5


@pytest.mark.parametrize("n", [1, 2, 7, 64])
def test_stratified_rows_fit_the_budget_and_never_repeat_a_coalition(n):
    seen = []

    def game(masks):
        seen.append(masks.copy())
        return masks.astype(float) @ np.arange(1.0, n + 1)

    att = explain_shap(game, n, estimator="stratified", max_rows=8 * n if n > 1 else 2, seed=0, exact_when_affordable=False)
    masks = np.concatenate(seen)
    assert att.rows == len(masks) <= max(8 * n, 2)
    # The empty and full coalitions are asked for once, not once per pass (cyclic shifts may still repeat a few
    # interior coalitions across passes: the evaluator's dedup evaluates those once).
    assert (~masks.any(axis=1)).sum() == 1 and masks.all(axis=1).sum() == 1
    np.testing.assert_allclose(att.values, np.arange(1.0, n + 1))  # additive game: every antithetic pass is exact
    with pytest.raises(BudgetError):
        explain_shap(game, n, estimator="stratified", max_rows=2 * n - 1, exact_when_affordable=False)


@pytest.mark.parametrize("estimator", ["stratified", "permutation", "kernel"])
def test_a_budget_of_every_coalition_enumerates_them_exactly(estimator):
    rng = np.random.default_rng(2)
    n = 7
    w, triple = rng.normal(size=n), rng.normal(size=(n, n, n))
    asked = []

    def game(masks):
        asked.append(len(masks))
        m = masks.astype(float)
        return m @ w + np.einsum("ni,nj,nk,ijk->n", m, m, m, triple)

    att = explain_shap(game, n, estimator=estimator, max_rows=2**n, seed=0)
    assert att.exact and att.rows == sum(asked) == 2**n
    np.testing.assert_allclose(att.values, exact_shapley(game, n), rtol=0, atol=1e-12)
    assert att.values.sum() == pytest.approx(att.full_value - att.base_value, abs=1e-12)
    # One row short of 2^n: the estimator runs (Kernel SHAP then still covers all 2^n − 2 interior coalitions, so
    # only the samplers are off the exact values on this cubic game).
    sampled = explain_shap(game, n, estimator=estimator, max_rows=2**n - 1, seed=0)
    assert not sampled.exact
    if estimator != "kernel":
        assert np.abs(sampled.values - exact_shapley(game, n)).max() > 1e-6


def test_stratified_passes_beyond_t_keep_converging():
    # Only T cyclic shifts of one ordering exist; more passes than that must bring new orderings, not repeats.
    rng = np.random.default_rng(1)
    n = 5
    w, triple = rng.normal(size=n), rng.normal(size=(n, n, n))

    def game(masks):
        m = masks.astype(float)
        return m @ w + np.einsum("ni,nj,nk,ijk->n", m, m, m, triple)

    exact = exact_shapley(game, n)
    sampled = dict(estimator="stratified", exact_when_affordable=False)
    few = [explain_shap(game, n, max_rows=2 + n * (2 * n - 1), seed=s, **sampled).values for s in range(20)]
    many = [explain_shap(game, n, max_rows=2 + 20 * n * (2 * n - 1), seed=s, **sampled).values for s in range(20)]
    err_few = np.mean([np.abs(v - exact).max() for v in few])
    err_many = np.mean([np.abs(v - exact).max() for v in many])
    assert err_many < 0.5 * err_few  # 20× the passes: ~4.5× smaller errors expected; repeated shifts give none


@pytest.mark.parametrize("estimator", ["permutation", "kernel"])
def test_shap_library_estimators_leave_the_global_numpy_rng_alone(estimator):
    np.random.seed(123)
    expected = np.random.random(3)
    np.random.seed(123)
    explain_shap(lambda m: m.astype(float).sum(axis=1), 12, estimator=estimator, max_rows=200, seed=7)
    assert np.array_equal(np.random.random(3), expected)
