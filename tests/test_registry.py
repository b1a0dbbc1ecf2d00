"""The explainer table (workers/registry.py): every row keeps the shaping invariants, its row count is what its
explainer asks for, and the engine, the request validation and the Celery dispatcher all read it."""

import dataclasses
import typing

import numpy as np
import pytest

from tokencredit.types import (
    EXPLAINERS,
    Component,
    DenseRewardItem,
    DenseRewardsRequest,
    Limits,
    MethodsConfig,
    ShapingWeights,
)
from workers import registry
from workers.engine import Engine, InvalidField
from workers.evaluator import CoalitionEvaluator, RowCounter
from workers.registry import REGISTRY, Explained, ExplainInput

PROMPT = "Tell me about your weekend."
RESPONSE = "It was amazing, I had a great time!"
LIMITS = Limits(max_items=8, max_response_tokens=200, max_total_tokens=1000, max_response_chars=2000)
NAMES = [c.value for c in REGISTRY]


@pytest.fixture(scope="module", params=["encoder", "causal"])
def engine(request, encoder_rm, causal_rm):
    return Engine(encoder_rm if request.param == "encoder" else causal_rm, LIMITS)


def _request(**kw) -> DenseRewardsRequest:
    return DenseRewardsRequest(items=[DenseRewardItem(prompt=PROMPT, response=RESPONSE)], **kw)


def test_the_table_has_a_row_for_every_explainer_of_the_wire_types():
    assert set(REGISTRY) == set(EXPLAINERS)
    assert Component.sparse not in REGISTRY  # sparse explains nothing: the engine places the score itself
    for component, explainer in REGISTRY.items():
        assert explainer.component is component
        # The request's `methods.<name>` is this row's config type, and the component has a weight.
        assert typing.get_args(MethodsConfig.model_fields[component.value].annotation) == (explainer.config, type(None))
        assert component.value in ShapingWeights.model_fields


@pytest.mark.parametrize("name", NAMES)
def test_every_explainer_keeps_the_shaping_invariants(engine, name):
    """Conservation (Σ rewards = R) and sign (each token's reward is its own attribution) for weight 1 on one row."""
    weights = ShapingWeights(**{name: 1.0})
    request = _request(weights=weights, return_attributions=True)
    if not registry.supports(Component(name), engine.model):
        with pytest.raises(InvalidField) as refused:
            engine.prepare(request)
        assert refused.value.field == f"weights.{name}" and "causal RM" in refused.value.message
        return
    result = engine.run(request, weights).results[0]
    assert result.error is None
    rewards = np.array(result.token_rewards)
    att = result.attributions[name]
    values = np.array(att.values)
    assert abs(rewards.sum() - result.score) <= 1e-9 * max(1.0, abs(result.score))
    assert abs(values.sum() + att.base - result.score) <= 1e-9 * max(1.0, abs(result.score))
    # Additive shaping: every token but the placement (last) token gets exactly its own attribution.
    np.testing.assert_allclose(rewards[:-1], values[:-1], rtol=0, atol=1e-12)
    assert np.array_equal(np.sign(rewards[:-1]), np.sign(values[:-1]))


@pytest.mark.parametrize("name", NAMES)
def test_rows_are_what_each_explainer_asks_for(engine, name):
    explainer = REGISTRY[Component(name)]
    if not registry.supports(explainer.component, engine.model):
        pytest.skip(f"{name} needs a causal RM")
    evaluator = CoalitionEvaluator(engine.model)
    inp = engine.model.encode(PROMPT, RESPONSE)
    counter = RowCounter()
    x = ExplainInput(evaluator, inp, counter, evaluator.score(inp), "last")
    explainer.explain(x, explainer.config())
    estimate = explainer.rows(inp.n_tokens, explainer.config())
    if explainer.component is Component.shap:
        assert 0 < counter.requested <= estimate  # the budget bounds the estimator's rows
    else:
        assert counter.requested == estimate


def test_the_dispatcher_sizes_batches_from_the_table(monkeypatch):
    from service.dispatch import estimate_rows

    request = _request(weights=ShapingWeights(sparse=0.5, loo=0.5))
    assert estimate_rows(9, request, [Component.sparse, Component.loo]) == 1 + 9 + 2
    patched = dataclasses.replace(REGISTRY[Component.loo], rows=lambda n_tokens, cfg: 1000)
    monkeypatch.setitem(REGISTRY, Component.loo, patched)
    assert estimate_rows(9, request, [Component.sparse, Component.loo]) == 1 + 1000


def test_validation_and_the_info_list_read_the_causal_rule_from_the_table(encoder_rm, monkeypatch):
    engine = Engine(encoder_rm, LIMITS)
    request = _request(weights=ShapingWeights(sparse=0.5, loo=0.5))
    engine.prepare(request)  # an encoder computes loo
    assert "loo" in registry.computable_components(encoder_rm)
    monkeypatch.setitem(REGISTRY, Component.loo, dataclasses.replace(REGISTRY[Component.loo], requires_causal=True))
    with pytest.raises(InvalidField) as refused:
        engine.prepare(request)
    assert refused.value.field == "weights.loo"
    assert "loo" not in registry.computable_components(encoder_rm)
    assert registry.uncomputable(ShapingWeights(sparse=0.5, loo=0.5), encoder_rm) == ["loo"]


def test_the_engine_explains_with_the_tables_function(encoder_rm, monkeypatch):
    def ramp(x, cfg):
        return Explained(np.arange(x.n_tokens, dtype=np.float64))

    monkeypatch.setitem(REGISTRY, Component.loo, dataclasses.replace(REGISTRY[Component.loo], explain=ramp))
    weights = ShapingWeights(loo=1.0)
    result = Engine(encoder_rm, LIMITS).run(_request(weights=weights, return_attributions=True), weights).results[0]
    assert result.attributions["loo"].values == list(range(result.rm_tokens))
