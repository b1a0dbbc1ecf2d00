"""Shaping math: additive rewards keep every token's own attribution, the mix conserves the score, baselines are
special cases; the sign-aware-l1 comparison scheme is still a distribution (and still has its documented defect)."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workers import shaping

EXPLAINED = ("shap", "lime", "loo", "prefix")
finite = st.floats(min_value=-50.0, max_value=50.0, allow_nan=False, allow_infinity=False)
# Attributions from noise level (1e-9) to large, both signs, and exact zeros.
attribution_value = st.one_of(finite, st.floats(min_value=-1e-6, max_value=1e-6), st.just(0.0))


@st.composite
def shaping_case(draw):
    n = draw(st.integers(min_value=1, max_value=40))
    score = draw(finite)
    values = {k: np.array(draw(st.lists(attribution_value, min_size=n, max_size=n))) for k in EXPLAINED}
    attention = np.array(draw(st.lists(st.floats(min_value=0.0, max_value=5.0), min_size=n, max_size=n)))
    raw = draw(st.lists(st.floats(min_value=0.0, max_value=1.0), min_size=6, max_size=6).filter(lambda w: sum(w) > 1e-3))
    weights = dict(zip(EXPLAINED + ("attention", "sparse"), (w / sum(raw) for w in raw)))
    placement = draw(st.sampled_from(shaping.RESIDUAL_PLACEMENTS))
    return n, score, values, attention, weights, placement


def _component_rewards(n, score, values, attention, placement):
    rewards = {k: shaping.additive_rewards(shaping.TokenAttribution.of(v, score), placement) for k, v in values.items()}
    share = shaping.normalize_nonnegative(attention, placement)
    rewards["attention"] = shaping.additive_rewards(shaping.TokenAttribution.of(score * share, score), placement)
    rewards["sparse"] = score * shaping.sparse_distribution(n)
    return rewards, share


@settings(max_examples=300, deadline=None)
@given(shaping_case())
def test_additive_mix_gives_every_non_placement_token_its_own_attribution(case):
    n, score, values, attention, weights, placement = case
    rewards, share = _component_rewards(n, score, values, attention, placement)
    r = shaping.mix_rewards(score, rewards, weights)
    scale = max(1.0, abs(score), *(np.abs(v).sum() for v in values.values()))
    # Conservation: Σ r = R to float64 rounding.
    assert abs(math.fsum(r) - score) <= 1e-12 * scale
    if placement == "last":
        # Every token but the last gets Σ_k w_k v_k[t] (attention: R·a_t; sparse: 0): its own attributions in score
        # units, whatever R, the other tokens' values, or how small the values are.
        expected = sum(weights[k] * values[k] for k in EXPLAINED) + weights["attention"] * score * share
        assert np.allclose(r[:-1], expected[:-1], rtol=1e-12, atol=1e-12 * scale)


@settings(max_examples=300, deadline=None)
@given(st.lists(attribution_value, min_size=1, max_size=40), finite)
def test_one_component_reward_is_its_value_with_its_sign_and_size(values, score):
    values = np.array(values)
    att = shaping.TokenAttribution.of(values, score)
    r = shaping.mix_rewards(score, {"shap": shaping.additive_rewards(att)}, {"shap": 1.0})
    # Bit for bit on every token but the placement token, which gets its value plus the base.
    assert r[:-1].tolist() == values[:-1].tolist()
    assert np.sign(r[:-1]).tolist() == np.sign(values[:-1]).tolist()
    assert r[-1] == pytest.approx(values[-1] + att.base, abs=1e-12 * max(1.0, abs(score), np.abs(values).sum()))
    assert abs(math.fsum(values) + att.base - score) <= 1e-12 * max(1.0, abs(score), np.abs(values).sum())


def test_uniform_placement_spreads_the_base_evenly():
    att = shaping.TokenAttribution.of([0.5, -1.0, 0.25, 0.0], 2.0)
    assert att.base == pytest.approx(2.25)
    r = shaping.additive_rewards(att, "uniform")
    assert np.allclose(r, np.array([0.5, -1.0, 0.25, 0.0]) + 2.25 / 4)


def test_the_reviews_cases_keep_their_signs_and_scale():
    # φ = [0.1, −1.0], R = 2: the token that helped keeps +0.1; the harmful last token's own −1.0 is reported,
    # and its reward is that value plus the base (what the tokens do not explain), not a rescaled share.
    att = shaping.TokenAttribution.of([0.1, -1.0], 2.0)
    assert shaping.additive_rewards(att).tolist() == pytest.approx([0.1, -1.0 + 2.9])
    # φ = [−0.5, 1.0], R = −2: the harmful token gets −0.5, not a share of −2.
    assert shaping.additive_rewards(shaping.TokenAttribution.of([-0.5, 1.0], -2.0))[0] == -0.5
    # Tokens explaining 0.1 of R = 3 get 0.02, 0.03 (no 30× inflation), and noise stays noise.
    assert shaping.additive_rewards(shaping.TokenAttribution.of([0.02, 0.03, 0.05], 3.0)).tolist() == pytest.approx([0.02, 0.03, 2.95])
    noise = np.random.default_rng(0).normal(scale=1e-4, size=6)
    assert np.abs(shaping.additive_rewards(shaping.TokenAttribution.of(noise, 5.0))[:-1]).max() < 1e-3


def test_sign_aware_l1_is_kept_for_comparison_and_has_the_documented_defect():
    # The reason it is no longer the default: a harmful last token gets most of the reward.
    r = 2.0 * shaping.normalize_signed(np.array([0.1, -1.0]), 2.0)
    assert r.tolist() == pytest.approx([0.1 / 1.1 * 2, 2 - 0.1 / 1.1 * 2])
    assert r[1] > r[0] > 0


@pytest.mark.parametrize("score", [3.0, -2.5, 0.0, 1e-12])
@pytest.mark.parametrize("seed", range(5))
def test_sign_aware_l1_is_a_distribution(score, seed):
    phi = np.random.default_rng(seed).normal(size=17)
    e = shaping.normalize_signed(phi, score)
    assert e.sum() == pytest.approx(1.0, abs=1e-12)
    assert np.all(np.isfinite(e))


def test_sign_aware_l1_is_stable_when_attributions_cancel():
    # Σφ = 0 exactly and Σφ ≈ 0: dividing by Σφ would explode; dividing by Σ|φ| does not.
    for phi in ([1.0, -1.0, 0.5, -0.5], [1.0, -1.0 + 1e-13, 2.0, -2.0]):
        e = shaping.normalize_signed(np.array(phi), 1.7)
        assert e.sum() == pytest.approx(1.0, abs=1e-12)
        assert np.abs(e).max() <= 1.0 + 1e-9


def test_all_zero_attributions_fall_back_to_the_residual_placement():
    assert np.array_equal(shaping.normalize_signed(np.zeros(4), 1.0), [0, 0, 0, 1])
    assert np.allclose(shaping.normalize_signed(np.zeros(4), 1.0, "uniform"), 0.25)
    assert np.array_equal(shaping.normalize_nonnegative(np.zeros(3)), [0, 0, 1])


def test_sparse_weight_one_is_ordinary_rlhf():
    rewards = {"sparse": 3.0 * shaping.sparse_distribution(5),
               "shap": shaping.additive_rewards(shaping.TokenAttribution.of(np.arange(5.0), 3.0))}
    r = shaping.mix_rewards(3.0, rewards, {"sparse": 1.0, "shap": 0.0})
    assert r.tolist() == [0.0, 0.0, 0.0, 0.0, 3.0]


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_sparse_plus_attention_reproduces_abc(beta):
    # ABC (attention-based-credit, rlhf_imdb.py): reward[-1] = (1-β)·R, then reward += β·R·attention_distribution.
    attention = np.array([0.2, 0.0, 1.3, 0.5])
    score = -1.4
    abc = np.zeros(4)
    abc[-1] = (1 - beta) * score
    abc += beta * score * attention / attention.sum()
    rewards = {"sparse": score * shaping.sparse_distribution(4), "attention": score * shaping.normalize_nonnegative(attention)}
    r = shaping.mix_rewards(score, rewards, {"sparse": 1 - beta, "attention": beta})
    assert np.allclose(r, abc, atol=1e-12)


def test_mix_rejects_missing_components_bad_lengths_and_empty_weights():
    with pytest.raises(KeyError):
        shaping.mix_rewards(1.0, {"sparse": shaping.sparse_distribution(3)}, {"shap": 1.0})
    with pytest.raises(ValueError):
        shaping.mix_rewards(1.0, {"sparse": shaping.sparse_distribution(3)}, {"sparse": 0.0})
    with pytest.raises(ValueError):
        shaping.mix_rewards(1.0, {"a": np.ones(3), "b": np.ones(4)}, {"a": 0.5, "b": 0.5})
    with pytest.raises(ValueError):
        shaping.TokenAttribution.of([1.0, float("nan")], 1.0)
