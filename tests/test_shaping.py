"""Shaping math: every component is a distribution, the mix conserves the score, baselines are special cases."""

import numpy as np
import pytest

from workers import shaping


@pytest.mark.parametrize("score", [3.0, -2.5, 0.0, 1e-12])
@pytest.mark.parametrize("seed", range(5))
def test_signed_normalization_is_a_distribution(score, seed):
    phi = np.random.default_rng(seed).normal(size=17)
    e = shaping.normalize_signed(phi, score)
    assert e.sum() == pytest.approx(1.0, abs=1e-12)
    assert np.all(np.isfinite(e))


def test_signed_normalization_is_stable_when_attributions_cancel():
    # Σφ = 0 exactly and Σφ ≈ 0: dividing by Σφ would explode; dividing by Σ|φ| does not.
    for phi in ([1.0, -1.0, 0.5, -0.5], [1.0, -1.0 + 1e-13, 2.0, -2.0]):
        e = shaping.normalize_signed(np.array(phi), 1.7)
        assert e.sum() == pytest.approx(1.0, abs=1e-12)
        assert np.abs(e).max() <= 1.0 + 1e-9
    # A tiny perturbation of φ changes e only a little (continuity at Σφ = 0).
    a = shaping.normalize_signed(np.array([1.0, -1.0, 0.3]), 2.0)
    b = shaping.normalize_signed(np.array([1.0, -1.0 + 1e-9, 0.3]), 2.0)
    assert np.abs(a - b).max() < 1e-8


def test_all_zero_attributions_fall_back_to_the_residual_placement():
    assert np.array_equal(shaping.normalize_signed(np.zeros(4), 1.0), [0, 0, 0, 1])
    assert np.allclose(shaping.normalize_signed(np.zeros(4), 1.0, "uniform"), 0.25)


@pytest.mark.parametrize("score", [2.0, -2.0])
def test_signed_normalization_credits_helpful_tokens_whatever_the_sign_of_the_score(score):
    phi = np.array([0.8, -0.5, 0.1, 0.0])  # token 0 pushed the score up, token 1 down
    r = score * shaping.normalize_signed(phi, score)
    assert r[0] > r[2] > r[1]
    assert r[0] > 0 > r[1]


def test_same_signed_shapley_values_summing_to_the_score_are_returned_exactly():
    phi = np.array([0.5, 0.25, 1.25])
    r = shaping.mix(2.0, {"shap": shaping.normalize_signed(phi, 2.0)}, {"shap": 1.0})
    assert np.allclose(r, phi, atol=1e-12)


def test_sparse_weight_one_is_ordinary_rlhf():
    dists = {"sparse": shaping.sparse_distribution(5), "shap": shaping.normalize_signed(np.arange(5.0), 3.0)}
    r = shaping.mix(3.0, dists, {"sparse": 1.0, "shap": 0.0})
    assert r.tolist() == [0.0, 0.0, 0.0, 0.0, 3.0]


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_sparse_plus_attention_reproduces_abc(beta):
    # ABC (attention-based-credit, rlhf_imdb.py): reward[-1] = (1-β)·R, then reward += β·R·attention_distribution.
    attention = np.array([0.2, 0.0, 1.3, 0.5])
    score = -1.4
    abc = np.zeros(4)
    abc[-1] = (1 - beta) * score
    abc += beta * score * attention / attention.sum()
    dists = {"sparse": shaping.sparse_distribution(4), "attention": shaping.normalize_nonnegative(attention)}
    r = shaping.mix(score, dists, {"sparse": 1 - beta, "attention": beta})
    assert np.allclose(r, abc, atol=1e-12)


@pytest.mark.parametrize("seed", range(10))
def test_mix_conserves_the_score(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 200))
    score = float(rng.normal() * 10)
    w = rng.dirichlet(np.ones(4))
    dists = {
        "sparse": shaping.sparse_distribution(n),
        "attention": shaping.normalize_nonnegative(rng.random(n)),
        "shap": shaping.normalize_signed(rng.normal(size=n), score),
        "lime": shaping.normalize_signed(rng.normal(size=n) * 1e-9, score),
    }
    r = shaping.mix(score, dists, dict(zip(dists, w)))
    # Conservation is enforced by construction (residual on the last token): float64 rounding only.
    assert abs(r.sum() - score) <= 1e-12 * max(1.0, abs(score))


def test_mix_rejects_missing_components_and_empty_weights():
    with pytest.raises(KeyError):
        shaping.mix(1.0, {"sparse": shaping.sparse_distribution(3)}, {"shap": 1.0})
    with pytest.raises(ValueError):
        shaping.mix(1.0, {"sparse": shaping.sparse_distribution(3)}, {"sparse": 0.0})
