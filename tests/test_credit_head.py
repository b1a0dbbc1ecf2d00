"""The amortized credit head (issue 15): the head itself, its checkpoints, serving through the engine (audit,
fallback, training examples), the background trainer, `tokencredit-server distill` and the HTTP surface.

Real tiny RMs (tests/tiny_models.py), labels from the service's own estimator, real server processes."""

from __future__ import annotations

import json
import threading
import time

import httpx
import numpy as np
import pytest

from tests import tiny_models
from tests.support import spawn_server, stop, wait_ready
from tokencredit.types import DenseRewardItem, DenseRewardsRequest, Limits, MethodsConfig, ShapConfig, ShapingWeights
from workers.credit_head import (
    CHECKPOINT_FORMAT, CreditHead, head_dir, label_example, latest_head_path, list_versions, token_features,
    train_head,
)
from workers.credit_serving import AmortizedCredit
from workers.engine import Engine, InvalidField
from workers.evaluator import CoalitionEvaluator

PROMPT = "Tell me about your weekend."
WORDS = " ".join(tiny_models.CORPUS[:4] + tiny_models.CORPUS[7:]).split()
LIMITS = Limits(max_items=8, max_response_tokens=200, max_total_tokens=2000, max_response_chars=2000)
SHAP_ONLY = ShapingWeights(shap=1.0)


def _responses(n: int, seed: int, lo: int = 6, hi: int = 12):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, int(rng.integers(lo, hi + 1)))) for _ in range(n)]


@pytest.fixture(scope="module")
def labelled(encoder_rm):
    """Training and held-out examples labelled by the service's own full-budget estimator (seed 0)."""
    evaluator = CoalitionEvaluator(encoder_rm)
    examples = [label_example(encoder_rm, evaluator, encoder_rm.encode(PROMPT, r)) for r in _responses(130, 0)]
    return examples[:110], examples[110:]


@pytest.fixture(scope="module")
def head(encoder_rm, labelled):
    train, _ = labelled
    return train_head(train, rm_name=encoder_rm.name, rm_revision=encoder_rm.revision, version=1, epochs=25)


# ---------------------------------------------------------------------------------------------------------- the head
def test_features_come_from_the_score_pass_of_an_encoder_rm(encoder_rm):
    inp = encoder_rm.encode(PROMPT, "It was amazing, I had a great time with friends!")
    features = token_features(encoder_rm, inp)
    assert features.score == CoalitionEvaluator(encoder_rm).score(inp)  # the same arithmetic: bit for bit
    assert features.tokens.shape == (inp.n_tokens, 2 * encoder_rm.model.config.hidden_size)


def test_labels_are_efficient_and_split_into_noise2noise_pairs(labelled):
    train, _ = labelled
    with_passes = [e for e in train if e.estimate is not None]
    assert with_passes
    for e in train:  # ≤ 5 tokens: 2^T ≤ 8T, so the service enumerates exact values (no passes)
        assert (e.estimate is None) == (e.features.n_tokens <= 5)
    for e in train:
        assert abs(e.target.sum() - e.delta) < 1e-9
        assert e.rows > e.features.n_tokens
    for e in with_passes:
        assert abs(e.estimate.sum() - e.delta) < 1e-9 and abs(e.estimate_target.sum() - e.delta) < 1e-9
        assert not np.allclose(e.estimate, e.estimate_target)


def test_predictions_sum_to_delta_and_beat_the_uniform_share_on_held_out_responses(head, labelled):
    _, held_out = labelled
    mse_head = mse_uniform = mse_plus = mse_one_pass = mse_plus_uniform = 0.0
    for e in held_out:
        alone = head.predict(e.features, e.delta)
        assert abs(alone.sum() - e.delta) <= 1e-9 * max(1.0, abs(e.delta))
        mse_head += float(np.mean((alone - e.target) ** 2))
        mse_uniform += float(np.mean((e.delta / len(e.target) - e.target) ** 2))
        if e.estimate is not None:
            plus = head.predict(e.features, e.delta, e.estimate)
            assert abs(plus.sum() - e.delta) <= 1e-9 * max(1.0, abs(e.delta))
            mse_plus += float(np.mean((plus - e.estimate_target) ** 2))
            mse_one_pass += float(np.mean((e.estimate - e.estimate_target) ** 2))
            mse_plus_uniform += float(np.mean((e.delta / len(e.target) - e.estimate_target) ** 2))
    assert mse_head < 0.8 * mse_uniform  # it learned something beyond Σ = Δ
    # amortized+k reads its pass (far better than the uniform share) and starts from it: on 110 responses of a random
    # tiny RM it stays near it, blend with the alone head included (whether it beats the pass on a real RM is
    # bench/amortized.py's question; here the blend weight comes from 10 validation responses, hence the margin).
    assert mse_plus < 0.5 * mse_plus_uniform and mse_plus < 1.5 * mse_one_pass


def test_checkpoints_are_versioned_atomic_and_refuse_other_formats(head, labelled, tmp_path):
    e = labelled[1][0]
    path = head.save(tmp_path)
    assert path.name == "head-v1.pt" and sorted(p.name for p in tmp_path.iterdir()) == ["head-v1.pt"]  # no temp left
    again = CreditHead.load(path)
    assert again.version == 1 and again.rm_revision == head.rm_revision
    assert 0.0 <= again.blend == head.blend <= 1.0 and head.reports["blend"] == head.blend
    assert np.array_equal(again.predict(e.features, e.delta), head.predict(e.features, e.delta))
    assert np.array_equal(again.predict(e.features, e.delta, e.estimate), head.predict(e.features, e.delta, e.estimate))
    head.version = 2
    try:
        head.save(tmp_path)
    finally:
        head.version = 1
    assert list_versions(tmp_path) == [1, 2] and latest_head_path(tmp_path).name == "head-v2.pt"
    import torch

    payload = torch.load(path, weights_only=True)
    payload["format"] = CHECKPOINT_FORMAT + 1
    torch.save(payload, tmp_path / "head-v3.pt")
    with pytest.raises(ValueError, match="format"):
        CreditHead.load(tmp_path / "head-v3.pt")
    # A server skips an unreadable newest file rather than failing (logged).
    assert AmortizedCredit(head.rm_name, head.rm_revision, root=tmp_path).load_latest() is None


# ------------------------------------------------------------------------------------------------------ the engine
def _amortized_request(estimator: str, texts, **kw):
    return DenseRewardsRequest(
        items=[DenseRewardItem(prompt=PROMPT, response=t) for t in texts], weights=SHAP_ONLY,
        methods=MethodsConfig(shap=ShapConfig(estimator=estimator)), return_attributions=True, **kw,
    )


def _credit(head, tmp_path, **kw) -> AmortizedCredit:
    credit = AmortizedCredit(head.rm_name, head.rm_revision, root=tmp_path, **kw)
    credit.publish(head, save=False)
    return credit


def test_without_a_head_the_amortized_estimators_are_a_422_naming_the_field(encoder_rm):
    engine = Engine(encoder_rm, LIMITS)
    for estimator in ("amortized", "amortized+k"):
        with pytest.raises(InvalidField) as err:
            engine.prepare(_amortized_request(estimator, ["It was fine."]))
        assert err.value.field == "methods.shap.estimator" and "distill" in err.value.message


@pytest.mark.parametrize("estimator", ["amortized", "amortized+k"])
def test_amortized_answers_conserve_the_score_and_name_the_head_version(encoder_rm, head, tmp_path, estimator):
    engine = Engine(encoder_rm, LIMITS)
    engine.credit = _credit(head, tmp_path, audit_fraction=0.0)
    texts = _responses(3, 7)
    out = engine.run(_amortized_request(estimator, texts), SHAP_ONLY)
    evaluator = CoalitionEvaluator(encoder_rm)
    rows = 0
    for text, result in zip(texts, out.results):
        assert result.error is None and result.shap_estimator == estimator and result.credit_head_version == 1
        assert abs(sum(result.token_rewards) - result.score) <= 1e-9 * max(1.0, abs(result.score))
        att = result.attributions["shap"]
        assert abs(sum(att.values) + att.base - result.score) <= 1e-9 * max(1.0, abs(result.score))
        inp = encoder_rm.encode(PROMPT, text)
        # The base is f(∅): the head only redistributes R − f(∅) (to fp32 batch rounding: one row or a batch).
        assert att.base == pytest.approx(float(evaluator(inp, np.zeros((1, inp.n_tokens), dtype=bool))[0]), abs=1e-5)
        rows += 2 if estimator == "amortized" else 2 * inp.n_tokens + 1
    assert out.rm_rows == rows  # amortized: the score pass (which gives the hidden states) and f(∅)


def test_audits_measure_live_fidelity_feed_training_and_fall_back_below_the_threshold(encoder_rm, head, tmp_path):
    engine = Engine(encoder_rm, LIMITS)
    # Every answer audited; a threshold no head can reach, so the mode falls back after min_audits audits.
    credit = engine.credit = _credit(head, tmp_path, audit_fraction=1.0, min_spearman=1.01, min_audits=3)
    texts = _responses(3, 11)
    out = engine.run(_amortized_request("amortized", texts), SHAP_ONLY)
    assert [r.credit_head_version for r in out.results] == [1, 1, 1]
    assert credit.stats.audits["amortized"] == 3 and credit.live_spearman("amortized") is not None
    assert credit.stats.examples == 3  # each audit's full-budget estimate is a training example
    assert credit.falls_back("amortized") and not credit.falls_back("amortized+k")
    fallen = engine.run(_amortized_request("amortized", texts[:1]), SHAP_ONLY).results[0]
    assert fallen.shap_estimator == "stratified" and fallen.credit_head_version is None
    assert abs(sum(fallen.token_rewards) - fallen.score) <= 1e-9 * max(1.0, abs(fallen.score))
    assert credit.stats.fallbacks["amortized"] == 1 and credit.stats.examples == 4
    # A new version starts with a clean audit record: served again.
    newer = train_head(credit.wait_for_examples(0, 1, timeout=0) * 4, rm_name=head.rm_name, rm_revision=head.rm_revision, version=2,
                       previous=head, epochs=1)
    credit.publish(newer, save=False)
    again = engine.run(_amortized_request("amortized", texts[:1]), SHAP_ONLY).results[0]
    assert again.shap_estimator == "amortized" and again.credit_head_version == 2


def test_full_budget_explanations_become_training_examples_and_cheaper_ones_do_not(encoder_rm, head, tmp_path):
    engine = Engine(encoder_rm, LIMITS)
    credit = engine.credit = _credit(head, tmp_path, audit_fraction=0.0)
    texts = _responses(2, 13, lo=8, hi=10)
    full = DenseRewardsRequest(items=[DenseRewardItem(prompt=PROMPT, response=t) for t in texts], weights=SHAP_ONLY)
    plain = Engine(encoder_rm, LIMITS).run(full, SHAP_ONLY)
    out = engine.run(full, SHAP_ONLY)
    assert credit.stats.examples == 2
    # Collecting costs no row on an encoder RM and changes no number.
    assert out.rm_rows == plain.rm_rows
    assert [r.token_rewards for r in out.results] == [r.token_rewards for r in plain.results]
    cheap = full.model_copy(update={"methods": MethodsConfig(shap=ShapConfig(max_rows=40))})
    engine.run(cheap, SHAP_ONLY)
    assert credit.stats.examples == 2


def test_a_causal_rm_collects_and_serves_too(causal_rm, tmp_path):
    evaluator = CoalitionEvaluator(causal_rm)
    examples = [label_example(causal_rm, evaluator, causal_rm.encode(PROMPT, r)) for r in _responses(12, 3)]
    head = train_head(examples, rm_name=causal_rm.name, rm_revision=causal_rm.revision, version=1, epochs=2)
    engine = Engine(causal_rm, LIMITS)
    engine.credit = _credit(head, tmp_path, audit_fraction=0.0)
    out = engine.run(_amortized_request("amortized", ["It was amazing, I had a great time!"]), SHAP_ONLY)
    result = out.results[0]
    assert result.error is None and result.credit_head_version == 1
    assert abs(sum(result.token_rewards) - result.score) <= 1e-9 * max(1.0, abs(result.score))
    assert out.rm_rows == 3  # score, hidden states (a pass of their own on a causal RM), f(∅)


# ------------------------------------------------------------------------------------------- the background trainer
def test_the_background_trainer_publishes_a_new_version_and_waits_while_the_engine_is_busy(head, labelled, tmp_path):
    from service.credit_trainer import CreditTrainer

    credit = _credit(head, tmp_path)
    busy = threading.Event()
    busy.set()
    trainer = CreditTrainer(credit, busy=busy.is_set, train_every=8, epochs=2).start()
    try:
        for e in labelled[0][:8]:
            credit.offer(e)
        # While busy, the fit never starts (the trainer is parked in its pause); nothing is published.
        deadline = time.monotonic() + 60
        while credit.held_examples and credit._new_examples and time.monotonic() < deadline:
            time.sleep(0.05)  # until the trainer took the batch
        assert credit.head.version == 1 and list_versions(credit.directory) == []
        busy.clear()
        deadline = time.monotonic() + 120
        while credit.head.version == 1:
            assert time.monotonic() < deadline, f"no new head version (trainer error: {trainer.last_error})"
            time.sleep(0.1)
    finally:
        trainer.stop()
    assert credit.head.version == 2 and list_versions(credit.directory) == [2]
    assert credit.stats.trainings == 2  # the fixture's publish and the trainer's
    assert not trainer.alive


# --------------------------------------------------------------------------------------------------- distill (CLI)
def test_distill_trains_a_version_from_jsonl_and_resumes_from_its_label_cache(encoder_rm_dir, tmp_path, capsys):
    from service.cli import main
    from workers.model import RewardModel

    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": PROMPT, "response": r}) for r in _responses(16, 5)) + "\n")
    args = ["distill", "--model", str(encoder_rm_dir), "--data", str(data), "--out-dir", str(tmp_path / "cache"),
            "--epochs", "2", "--quiet", "--compile-rows", "off"]
    assert main(args) == 0
    model = RewardModel.load(encoder_rm_dir)
    directory = head_dir(model.name, model.revision, tmp_path / "cache")
    assert list_versions(directory) == [1]
    labels = sorted((directory / "labels").iterdir())
    assert len(labels) == 16
    stamps = [p.stat().st_mtime_ns for p in labels]
    assert main(args) == 0  # a second run reuses every label and trains version 2
    assert list_versions(directory) == [1, 2]
    assert [p.stat().st_mtime_ns for p in sorted((directory / "labels").iterdir())] == stamps
    assert "credit head v2: 16 responses" in capsys.readouterr().out


def test_distill_names_the_bad_line_before_loading_any_model(tmp_path, capsys):
    from service.cli import main

    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "p", "response": "r"}) + "\n" + json.dumps({"prompt": "p"}) + "\n")
    assert main(["distill", "--model", str(tmp_path / "no-such-model"), "--data", str(data)]) == 2
    assert "pairs.jsonl:2" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------- HTTP
def test_server_serves_a_distilled_head_with_its_version_and_exports_live_fidelity(encoder_rm_dir, tmp_path):
    from service.cli import main

    cache = tmp_path / "cache"
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": PROMPT, "response": r}) for r in _responses(12, 9)) + "\n")
    body = {"items": [{"prompt": PROMPT, "response": "It was amazing, I had a great time with friends!"}],
            "weights": {"shap": 1}, "methods": {"shap": {"estimator": "amortized"}}}
    log = tmp_path / "server.log"
    proc, url = spawn_server(encoder_rm_dir, log, credit_dir=cache, credit_audit_fraction=1.0)
    try:
        wait_ready(proc, url, log)
        refused = httpx.post(f"{url}/v1/dense_rewards", json=body, timeout=60)
        assert refused.status_code == 422 and refused.json()["error"]["field"] == "methods.shap.estimator"
    finally:
        stop(proc)
    assert main(["distill", "--model", str(encoder_rm_dir), "--data", str(data), "--out-dir", str(cache),
                 "--epochs", "2", "--quiet", "--compile-rows", "off"]) == 0
    proc, url = spawn_server(encoder_rm_dir, log, credit_dir=cache, credit_audit_fraction=1.0)
    try:
        wait_ready(proc, url, log)
        r = httpx.post(f"{url}/v1/dense_rewards", json=body, timeout=60)
        assert r.status_code == 200, r.text
        result = r.json()["results"][0]
        assert result["shap_estimator"] == "amortized" and result["credit_head_version"] == 1
        assert abs(sum(result["token_rewards"]) - result["score"]) <= 1e-9 * max(1.0, abs(result["score"]))
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
    finally:
        stop(proc)
    assert "tokencredit_credit_head_version 1.0" in metrics
    assert 'tokencredit_credit_audits{mode="amortized"} 1.0' in metrics
    live = [line for line in metrics.splitlines() if line.startswith('tokencredit_credit_live_spearman{mode="amortized"}')]
    assert live and -1.0 <= float(live[0].split()[-1]) <= 1.0


def test_server_learns_a_head_online_from_its_own_full_budget_requests(encoder_rm_dir, tmp_path):
    cache = tmp_path / "cache"
    log = tmp_path / "server.log"
    proc, url = spawn_server(encoder_rm_dir, log, credit_dir=cache, credit_train_every=8)
    texts = _responses(8, 21)
    try:
        wait_ready(proc, url, log)
        full = {"items": [{"prompt": PROMPT, "response": t} for t in texts], "weights": {"shap": 1}}
        assert httpx.post(f"{url}/v1/dense_rewards", json=full, timeout=120).status_code == 200
        deadline = time.monotonic() + 120
        while "tokencredit_credit_head_version 1.0" not in httpx.get(f"{url}/metrics", timeout=10).text:
            assert time.monotonic() < deadline, "no head trained from 8 full-budget explanations"
            time.sleep(0.2)
        body = {"items": [{"prompt": PROMPT, "response": texts[0]}], "weights": {"shap": 1},
                "methods": {"shap": {"estimator": "amortized+k"}}}
        r = httpx.post(f"{url}/v1/dense_rewards", json=body, timeout=60)
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
    finally:
        stop(proc)
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["credit_head_version"] == 1
    assert "tokencredit_credit_examples 8.0" in metrics and "tokencredit_credit_trainings 1.0" in metrics
    assert (cache / "credit-heads").is_dir() and any((cache / "credit-heads").rglob("head-v1.pt"))
