"""The engine end to end (no HTTP): conservation for every component, alignment to policy tokens, baselines."""

import numpy as np
import pytest

from tokencredit.types import DenseRewardItem, DenseRewardsRequest, Limits, MethodsConfig, ShapConfig, ShapingWeights
from workers.engine import Engine, InvalidField, PayloadTooLarge

PROMPT = "Tell me about your weekend."
TEXTS = [
    "It was amazing, I had a great time with friends!",
    "Café crème at señor Müller's: déjà vu 😀👍🏽",
    "日本語のテキスト and 中文 were awful, everything went wrong.",
]
ALL = ShapingWeights(sparse=0.1, attention=0.2, shap=0.3, lime=0.2, loo=0.2)
FAST = MethodsConfig(shap=ShapConfig(max_rows=300, seed=1))
LIMITS = Limits(max_items=8, max_response_tokens=200, max_total_tokens=1000, max_response_chars=2000)


def _conserved(result, rel=1e-9):
    # The engine puts the float residual on the last token, so Σ equals the score to float64 rounding.
    assert abs(sum(result.token_rewards) - result.score) <= rel * max(1.0, abs(result.score))


@pytest.fixture(scope="module", params=["encoder", "causal"])
def engine(request, encoder_rm, causal_rm):
    return Engine(encoder_rm if request.param == "encoder" else causal_rm, LIMITS)


def _request(**kw):
    items = kw.pop("items", None) or [DenseRewardItem(prompt=PROMPT, response=t) for t in TEXTS]
    return DenseRewardsRequest(items=items, methods=kw.pop("methods", FAST), **kw)


def test_every_component_and_the_mix_conserve_the_score(engine):
    request = _request(weights=ALL, return_components=True)
    out = engine.run(request, ALL)
    assert out.rm_rows > 0
    for result in out.results:
        assert result.error is None
        _conserved(result)
        assert len(result.token_rewards) == len(result.spans) == result.rm_tokens
        assert set(result.components) == {"sparse", "attention", "shap", "lime", "loo"}
        for rewards in result.components.values():
            assert abs(sum(rewards) - result.score) <= 1e-9 * max(1.0, abs(result.score))
        mixed = sum(ALL.as_dict()[k] * np.array(v) for k, v in result.components.items())
        assert np.allclose(mixed, result.token_rewards, atol=1e-9)


def test_sparse_weight_one_puts_the_whole_score_on_the_last_policy_token(engine, bpe_policy_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(bpe_policy_tokenizer_dir)
    ids = tok(TEXTS[1], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    request = _request(
        items=[DenseRewardItem(prompt=PROMPT, response=TEXTS[1], response_token_ids=ids)],
        policy_tokenizer=str(bpe_policy_tokenizer_dir),
        weights=ShapingWeights(sparse=1.0),
    )
    result = engine.run(request, request.weights).results[0]
    assert len(result.token_rewards) == len(ids)
    assert result.token_rewards[:-1] == [0.0] * (len(ids) - 1)
    assert result.token_rewards[-1] == result.score  # on the EOS token, as ordinary RLHF places it


@pytest.mark.parametrize("beta", [0.25, 1.0])
def test_sparse_plus_attention_is_abc(engine, beta):
    request = _request(items=[DenseRewardItem(prompt=PROMPT, response=TEXTS[0])], weights=ShapingWeights(sparse=1 - beta, attention=beta))
    result = engine.run(request, request.weights).results[0]
    inp = engine.model.encode(PROMPT, TEXTS[0])
    attention = engine.evaluator.attention(inp)
    abc = beta * result.score * attention / attention.sum()
    abc[-1] += (1 - beta) * result.score
    assert np.allclose(result.token_rewards, abc, atol=1e-6 * max(1.0, abs(result.score)))


def test_policy_token_ids_get_one_conserved_reward_each(engine, bpe_policy_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(bpe_policy_tokenizer_dir)
    items = []
    for text in TEXTS:
        items.append(DenseRewardItem(prompt=PROMPT, response=text, response_token_ids=tok(text, add_special_tokens=False)["input_ids"]))
    request = _request(items=items, policy_tokenizer=str(bpe_policy_tokenizer_dir), weights=ALL)
    for item, result in zip(items, engine.run(request, ALL).results):
        assert len(result.token_rewards) == len(item.response_token_ids) == len(result.spans)
        _conserved(result)
        assert result.coverage == pytest.approx(1.0)
        # Spans are the policy tokens' characters: they tile the response.
        assert "".join(item.response[a:b] for a, b in _dedup(result.spans)) == item.response


def _dedup(spans):
    # Byte-level pieces of one character share its character span; keep each span once.
    out = []
    for span in spans:
        if not out or tuple(span) != tuple(out[-1]):
            out.append(tuple(span))
    return out


def test_offsets_that_miss_text_lower_coverage_but_keep_the_sum(engine):
    text = TEXTS[0]
    # Word spans that tile the text (each word with the whitespace before it), as a policy tokenizer would.
    ends = [i + len(w) for i, w in _words(text)]
    words = list(zip([0] + ends[:-1], ends))
    partial = words[::2]  # every other word: the rest of the mass is unmapped
    request = _request(items=[DenseRewardItem(prompt=PROMPT, response=text, response_token_offsets=partial)], weights=ShapingWeights(shap=0.5, loo=0.5))
    result = engine.run(request, request.weights).results[0]
    assert len(result.token_rewards) == len(partial)
    _conserved(result)
    assert 0.0 < result.coverage < 1.0
    full = _request(items=[DenseRewardItem(prompt=PROMPT, response=text, response_token_offsets=words)], weights=ShapingWeights(shap=0.5, loo=0.5))
    assert engine.run(full, full.weights).results[0].coverage == pytest.approx(1.0)


def _words(text):
    import re

    return [(m.start(), m.group()) for m in re.finditer(r"\S+", text)]


def test_one_failing_item_does_not_sink_the_batch(engine, monkeypatch):
    original = engine.evaluator.score
    calls = {"n": 0}

    def flaky(inp, counter=None):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated device error")
        return original(inp, counter)

    monkeypatch.setattr(engine.evaluator, "score", flaky)
    out = engine.run(_request(weights=ShapingWeights(loo=1.0)), ShapingWeights(loo=1.0))
    assert [r.error is None for r in out.results] == [True, False, True]
    assert out.results[1].error.code == "explain_failed" and out.results[1].token_rewards is None


def test_limits_and_bad_ids_are_refused_before_any_rm_row(engine, bpe_policy_tokenizer_dir):
    too_many = _request(items=[DenseRewardItem(prompt="p", response="ok")] * 9, weights=ALL)
    with pytest.raises(PayloadTooLarge) as info:
        engine.prepare(too_many)
    assert info.value.field == "items" and info.value.limit == 8
    no_tok = _request(items=[DenseRewardItem(prompt="p", response="ok", response_token_ids=[1, 2])], weights=ALL)
    with pytest.raises(InvalidField) as info:
        engine.prepare(no_tok)
    assert info.value.field == "policy_tokenizer"
    wrong_text = _request(
        items=[DenseRewardItem(prompt="p", response="something else", response_token_ids=[40, 41])],
        policy_tokenizer=str(bpe_policy_tokenizer_dir), weights=ALL,
    )
    with pytest.raises(InvalidField) as info:
        engine.prepare(wrong_text)
    assert info.value.field == "items[0].response_token_ids"


def test_warmup_runs_every_explainer(engine):
    assert engine.warmup() > 0


# ---------------------------------------------------------------------------------------------- attributions
SHORT = "What a great time!"  # 5 (encoder) and 10 (causal) RM tokens: 1024 rows enumerate every coalition


def _exact_shapley_by_formula(evaluator, inp):
    """Reference Shapley values, written independently of the service: the subset formula over itertools
    combinations, with every coalition scored in fp32 by one evaluator call (rows at the evaluator's precision)."""
    import itertools
    from math import factorial

    T = inp.n_tokens
    subsets = [frozenset(c) for k in range(T + 1) for c in itertools.combinations(range(T), k)]
    masks = np.array([[t in s for t in range(T)] for s in subsets], dtype=bool)
    value = dict(zip(subsets, evaluator(inp, masks)))
    return np.array([
        sum(factorial(len(s)) * factorial(T - len(s) - 1) / factorial(T) * (value[s | {i}] - value[s])
            for s in subsets if i not in s)
        for i in range(T)
    ])


@pytest.mark.parametrize("placement", ["last", "uniform"])
def test_additive_shap_rewards_are_the_attributions_plus_the_base_on_the_placement(engine, placement):
    request = _request(weights=ShapingWeights(shap=1.0), return_attributions=True, residual_placement=placement)
    for result in engine.run(request, request.weights).results:
        att = result.attributions["shap"]
        assert set(result.attributions) == {"shap"} and len(att.values) == len(result.token_rewards)
        assert abs(sum(att.values) + att.base - result.score) <= 1e-9 * max(1.0, abs(result.score))
        if placement == "last":
            assert result.token_rewards[:-1] == att.values[:-1]
            assert result.token_rewards[-1] == pytest.approx(att.values[-1] + att.base, abs=1e-9)
        else:
            expected = np.array(att.values) + att.base / len(att.values)
            assert np.allclose(result.token_rewards, expected, atol=1e-9)


def test_shap_base_is_the_empty_coalition_score(engine):
    request = _request(weights=ShapingWeights(shap=1.0), return_attributions=True)
    result = engine.run(request, request.weights).results[0]
    inp = engine.model.encode(PROMPT, TEXTS[0])
    empty = engine.evaluator(inp, np.zeros((1, inp.n_tokens), dtype=bool))[0]
    full_rows = engine.evaluator(inp, np.ones((1, inp.n_tokens), dtype=bool))[0]
    # b = R − Σφ = f(∅) + (R − f_rows(x)): equal to f(∅) when rows run at the score's precision (fp32 here). The
    # estimator's f(∅) and f(x) come from inside a batch, these from lone rows: fp32 rounding differs by ~10 ulp
    # (1.4e-6 seen on 2.04; tests/test_explainers.py explains why), far below a wrong base (≥ 1e-2 here).
    assert result.attributions["shap"].base == pytest.approx(empty + result.score - full_rows, abs=1e-5 * max(1.0, abs(empty)))


def test_every_explained_component_reports_attributions_that_add_up(engine, bpe_policy_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(bpe_policy_tokenizer_dir)
    ids = tok(TEXTS[1], add_special_tokens=False)["input_ids"]
    weights = ALL if engine.model.kind == "encoder" else ShapingWeights(sparse=0.1, attention=0.2, shap=0.3, lime=0.1, loo=0.1, prefix=0.2)
    request = _request(items=[DenseRewardItem(prompt=PROMPT, response=TEXTS[1], response_token_ids=ids)],
                       policy_tokenizer=str(bpe_policy_tokenizer_dir), weights=weights, return_attributions=True,
                       return_components=True)
    result = engine.run(request, weights).results[0]
    assert set(result.attributions) == set(weights.as_dict()) - {"sparse"} - {k for k, v in weights.as_dict().items() if v == 0}
    for name, att in result.attributions.items():
        # On the policy's tokens, like token_rewards; each component's rewards are its values plus its base on
        # the last policy token.
        assert len(att.values) == len(ids) == len(result.token_rewards), name
        assert abs(sum(att.values) + att.base - result.score) <= 1e-9 * max(1.0, abs(result.score)), name
        assert np.allclose(result.components[name][:-1], att.values[:-1], atol=1e-12), name
    mixed = sum(weights.as_dict()[k] * np.array(v) for k, v in result.components.items())
    assert np.allclose(mixed, result.token_rewards, atol=1e-9)


def test_budget_covering_every_coalition_gives_exact_shapley_values(engine):
    inp = engine.model.encode(PROMPT, SHORT)
    assert 2 <= inp.n_tokens <= 10
    request = _request(items=[DenseRewardItem(prompt=PROMPT, response=SHORT)], weights=ShapingWeights(shap=1.0),
                       methods=MethodsConfig(shap=ShapConfig(max_rows=1024)), return_attributions=True)
    result = engine.run(request, request.weights).results[0]
    assert result.shap_estimator == "exact" and result.attributions["shap"].exact is True
    reference = _exact_shapley_by_formula(engine.evaluator, inp)
    assert np.allclose(result.attributions["shap"].values, reference, rtol=0, atol=1e-9 * max(1.0, np.abs(reference).max()))
    # Efficiency: Σφ = f(x) − f(∅) (exact on the estimator's own rows, to 1e-12 in tests/test_explainers.py; here
    # against a 2-row batch, whose fp32 rounding may differ by ~10 ulp).
    full, empty = engine.evaluator(inp, np.array([[True] * inp.n_tokens, [False] * inp.n_tokens]))
    assert abs(sum(result.attributions["shap"].values) - (full - empty)) <= 1e-5 * max(abs(full - empty), abs(full), 1e-9)


def test_small_budget_samples_and_says_so(engine):
    request = _request(items=[DenseRewardItem(prompt=PROMPT, response=TEXTS[0])], weights=ShapingWeights(shap=1.0),
                       return_attributions=True)
    result = engine.run(request, request.weights).results[0]
    assert result.rm_tokens > 6  # 2^T > 8T: the default budget cannot enumerate
    assert result.shap_estimator == "stratified" and result.attributions["shap"].exact is False


def test_sign_aware_l1_stays_available_and_conserves(engine):
    request = _request(weights=ShapingWeights(sparse=0.5, shap=0.5), normalization="sign-aware-l1", return_attributions=True)
    for result in engine.run(request, request.weights).results:
        _conserved(result)
        att = result.attributions["shap"]
        e = np.array(result.token_rewards) - 0.5 * result.score * np.eye(len(att.values))[-1]
        # Tokens other than the last carry 0.5·|R|·φ/Σ|φ|: rescaled, not the values themselves.
        scale = abs(result.score) / np.abs(att.values).sum()
        assert np.allclose(e[:-1], 0.5 * scale * np.array(att.values[:-1]), atol=1e-9)
