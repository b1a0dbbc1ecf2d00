"""The HTTP API against a real uvicorn process on loopback (tiny random RMs, small limits so they are easy to hit)."""

from __future__ import annotations

import json
import math
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.support import spawn_server, wait_ready

LIMITS = {"max_items": 4, "max_response_tokens": 48, "max_total_tokens": 120}
MAX_BODY = 200_000
ITEM = {"prompt": "Tell me about the movie.", "response": "The movie was wonderful and the acting was superb."}


def _spawn(model_dir, log_path: Path, host: str | None = "127.0.0.1", **settings):
    """`service.cli serve` with this module's limits and body cap; warm-up and compiled rows are the server's own
    defaults unless given (the deployed path). Returns (proc, url, port, log_path)."""
    settings = {"warmup": None, "compile_rows": None, "max_body_bytes": MAX_BODY, **LIMITS, **settings}
    proc, url = spawn_server(model_dir, log_path, host=host, log_level="warning", **settings)
    return proc, url, int(url.rsplit(":", 1)[1]), log_path


@pytest.fixture(scope="module")
def servers(encoder_rm_dir, causal_rm_dir, bpe_policy_tokenizer_dir, tmp_path_factory):
    """Both servers start at once. The encoder server binds --host 127.0.0.1 and warms up (the deployed path).

    The causal one gets no --host, to test the default bind, and no warm-up: on a 2-core box warm-up costs ~20 s,
    nearly all of it shap's numba JIT, so its test uses shap-free weights (the JIT is paid once, by the encoder server).
    """
    logs = tmp_path_factory.mktemp("srv")
    spawned = {
        # Own shaping-version stores (not ~/.cache/tokencredit/shaping.sqlite3): these tests expect version 1.
        # fp32 rows: the exact-Shapley test compares the service's values with an enumeration done here; bf16 rows
        # round differently with the batch layout (1.3 % of the largest value measured), fp32 rows to ~1e-7.
        # The policy tokenizer the tests name is offered (TOKENCREDIT_TOKENIZER_DIRS; tests/test_auth.py has the rest).
        "encoder": _spawn(encoder_rm_dir, logs / "encoder.log", state_db=logs / "encoder.sqlite3", explain_dtype="float32",
                          tokenizer_dirs=bpe_policy_tokenizer_dir),
        "causal": _spawn(causal_rm_dir, logs / "causal.log", host=None, warmup="false", state_db=logs / "causal.sqlite3"),
    }
    try:
        for proc, url, _, log_path in spawned.values():
            wait_ready(proc, url, log_path)
        yield {name: (url, port) for name, (_, url, port, _) in spawned.items()}
    finally:
        for proc, *_ in spawned.values():
            proc.kill()
            proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(servers):
    return servers["encoder"]


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server[0], timeout=120) as c:
        yield c


def _post(client, body, status=200):
    r = client.post("/v1/dense_rewards", json=body)
    assert r.status_code == status, r.text
    return r.json()


def assert_conserved(rewards, score):
    # Rewards are float64 on the server (e·R with Σe = 1, then `conserve`), sent as shortest-repr JSON floats, so
    # Σ r_t matches R to ~T·1e-16·Σ|r|. 1e-5 relative is loose enough for any summation order yet catches a lost
    # token or an unnormalised component; the 1e-9 floor keeps it meaningful when the score is ~0.
    assert math.isclose(sum(rewards), score, rel_tol=0.0, abs_tol=max(1e-5 * abs(score), 1e-9)), (sum(rewards), score)


def _n_rm_tokens(encoder_rm_dir, text):
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(str(encoder_rm_dir))(text, add_special_tokens=False)["input_ids"])


# ---------------------------------------------------------------------------------------------------- health, info
def test_health_ready_info(client):
    assert client.get("/healthz").status_code == 200
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["model"]["kind"] == "encoder"
    info = client.get("/v1/info").json()
    assert info["components"] == ["sparse", "attention", "shap", "lime", "loo"]
    assert {k: info["limits"][k] for k in LIMITS} == LIMITS
    assert info["shaping"]["version"] == 1
    assert info["shaping"]["weights"] == {"sparse": 0.2, "attention": 0.0, "shap": 0.8, "lime": 0.0, "loo": 0.0, "prefix": 0.0}


# ---------------------------------------------------------------------------------------------------- happy paths
def test_rm_tokens_default(client):
    out = _post(client, {"items": [ITEM, dict(ITEM, id="mine")]})
    assert [r["id"] for r in out["results"]] == ["0", "mine"]
    assert out["shaping"]["version"] == 1 and out["usage"]["rm_rows"] > 0
    for r in out["results"]:
        assert r["error"] is None
        assert len(r["token_rewards"]) == len(r["spans"]) == r["rm_tokens"] > 0
        assert all(0 <= s <= e <= len(ITEM["response"]) for s, e in r["spans"])
        assert_conserved(r["token_rewards"], r["score"])


def test_offsets(client):
    response = ITEM["response"]
    offsets = [[0, 3], [4, 9], [10, 13], [14, 24], [25, 50]]  # "The", "movie", "was", "wonderful", rest
    r = _post(client, {"items": [dict(ITEM, response_token_offsets=offsets)]})["results"][0]
    assert len(r["token_rewards"]) == len(offsets) and [list(s) for s in r["spans"]] == offsets
    assert len(response) == 50 and 0.0 <= r["coverage"] <= 1.0
    assert_conserved(r["token_rewards"], r["score"])


def test_policy_ids(client, bpe_policy_tokenizer_dir):
    from transformers import AutoTokenizer

    response = "Café crème, señor Müller! Emoji 😀👍🏽 at the end."
    ids = AutoTokenizer.from_pretrained(str(bpe_policy_tokenizer_dir))(response, add_special_tokens=False)["input_ids"]
    body = {"items": [dict(ITEM, response=response, response_token_ids=ids)], "policy_tokenizer": str(bpe_policy_tokenizer_dir)}
    r = _post(client, body)["results"][0]
    assert len(r["token_rewards"]) == len(ids) == len(r["spans"])
    assert r["coverage"] == 1.0
    assert_conserved(r["token_rewards"], r["score"])


def test_sparse_only(client):
    r = _post(client, {"items": [ITEM], "weights": {"sparse": 1}})["results"][0]
    assert all(x == 0.0 for x in r["token_rewards"][:-1])
    assert math.isclose(r["token_rewards"][-1], r["score"], rel_tol=1e-12, abs_tol=1e-12)


MIXED = {
    "items": [ITEM],
    "weights": {"sparse": 0.1, "attention": 0.2, "shap": 0.4, "lime": 0.3},
    "methods": {"shap": {"max_rows": 200, "seed": 1}, "lime": {"num_samples": 100}},
    "return_components": True,
}


def test_components_and_determinism(client):
    first = _post(client, MIXED)
    r = first["results"][0]
    assert first["shaping"]["version"] is None and first["usage"]["rm_rows"] > 0
    assert set(r["components"]) == {"sparse", "attention", "shap", "lime"}
    for name, values in r["components"].items():
        assert len(values) == len(r["token_rewards"]), name
        assert_conserved(values, r["score"])
    assert_conserved(r["token_rewards"], r["score"])
    second = _post(client, MIXED)["results"][0]
    assert second["token_rewards"] == r["token_rewards"] and second["components"] == r["components"]


def test_shap_rewards_are_the_attributions_with_the_base_on_the_last_token(client):
    r = _post(client, {"items": [ITEM], "weights": {"shap": 1}, "return_attributions": True})["results"][0]
    shap = r["attributions"]["shap"]
    values, base = shap["values"], shap["base"]
    assert list(r["attributions"]) == ["shap"] and len(values) == len(r["token_rewards"]) == r["rm_tokens"]
    assert r["token_rewards"][:-1] == values[:-1]
    assert math.isclose(r["token_rewards"][-1], values[-1] + base, rel_tol=0, abs_tol=1e-9 * max(1.0, abs(base)))
    assert math.isclose(math.fsum(values) + base, r["score"], rel_tol=1e-4, abs_tol=1e-9)


TEN_TOKENS = "The movie was wonderful and the plot was bad!"


def test_a_budget_of_every_coalition_returns_exact_shapley_values(client, encoder_rm_dir):
    """`max_rows` 1024 on a 10-token response: the service's values equal Shapley values by enumeration, computed
    here independently (subset formula) on the same RM, rows at the server's precision."""
    import itertools
    from math import factorial

    import numpy as np

    from workers.evaluator import CoalitionEvaluator
    from workers.model import RewardModel

    assert _n_rm_tokens(encoder_rm_dir, TEN_TOKENS) == 10
    body = {"items": [dict(ITEM, response=TEN_TOKENS)], "weights": {"shap": 1}, "return_attributions": True,
            "methods": {"shap": {"max_rows": 1024}}}
    out = _post(client, body)
    r = out["results"][0]
    assert r["shap_estimator"] == "exact" and r["attributions"]["shap"]["exact"] is True
    assert out["usage"]["shap_exact_items"] == 1 and out["usage"]["rm_rows"] <= 1024 + 1
    rm = RewardModel.load(encoder_rm_dir, compile_rows="off", explain_dtype="float32")  # the server's settings
    inp = rm.encode(ITEM["prompt"], TEN_TOKENS)
    T = inp.n_tokens
    subsets = [frozenset(c) for k in range(T + 1) for c in itertools.combinations(range(T), k)]
    value = dict(zip(subsets, CoalitionEvaluator(rm)(inp, np.array([[t in s for t in range(T)] for s in subsets]))))
    exact = [sum(factorial(len(s)) * factorial(T - len(s) - 1) / factorial(T) * (value[s | {i}] - value[s])
                 for s in subsets if i not in s) for i in range(T)]
    scale = max(abs(v) for v in exact)
    assert max(abs(a - b) for a, b in zip(r["attributions"]["shap"]["values"], exact)) <= 1e-5 * scale
    # Efficiency: Σφ = f(x) − f(∅). Exact on the service's own rows (tests/test_explainers.py checks it to 1e-12);
    # here against rows evaluated in other batches, whose fp32 rounding differs by ~1e-6 of the score.
    spread = value[frozenset(range(T))] - value[frozenset()]
    assert math.isclose(math.fsum(r["attributions"]["shap"]["values"]), spread, rel_tol=5e-5, abs_tol=1e-9)


# ---------------------------------------------------------------------------------------------------- errors
def _item(**kw):
    return dict(ITEM, **kw)


BAD = [
    ({"items": [_item(response="  \n")]}, 422, "items[0].response"),
    ({"items": [_item(response_token_offsets=[[0, 3], [4, 99]])]}, 422, "items[0].response_token_offsets"),
    ({"items": [_item(response_token_offsets=[[0, 5], [3, 8]])]}, 422, "items[0].response_token_offsets"),
    ({"items": [_item(response_token_ids=[1, 2])]}, 422, "policy_tokenizer"),
    ({"items": [_item(response_token_ids=[1, 2])], "policy_tokenizer": "/no/such/tokenizer"}, 422, "policy_tokenizer"),
    ({"items": [ITEM], "weights": {"sparse": 0.4, "shap": 0.5}}, 422, "weights"),
    ({"items": [ITEM], "weights": {"sparse": 0.6, "loo": 0.5, "shap": -0.1}}, 422, "weights.shap"),
    ({"items": [ITEM], "weights": {"sparse": 0.5, "bogus": 0.5}}, 422, "weights.bogus"),
    ({"items": [ITEM], "methods": {"magic": {}}}, 422, "methods.magic"),
    ({"items": [ITEM], "methods": {"shap": {"max_rows": 3}}}, 422, "methods.shap.max_rows"),
    ({"items": [ITEM], "wieghts": {"sparse": 1}}, 422, "wieghts"),
    ({"items": []}, 422, "items"),
    ({"items": [ITEM] * 5}, 413, "items"),
    ({"items": [_item(response_token_offsets=[[0, 3]], response_token_ids=[1])]}, 422, None),
    ({"items": [ITEM], "normalization": "l2"}, 422, "normalization"),
    ({"items": [ITEM], "normalization": None}, 422, "normalization"),
    ({"items": [ITEM], "return_attributions": "yes"}, 422, "return_attributions"),
    ({"items": [ITEM], "return_attributions": 1}, 422, "return_attributions"),
    ({"items": [ITEM], "residual_placement": "first"}, 422, "residual_placement"),
]


@pytest.mark.parametrize("body,status,field", BAD, ids=[f"{b[1]}-{b[2]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input(client, body, status, field):
    err = _post(client, body, status)["error"]
    assert set(err) == {"code", "message", "field", "retryable"}
    if field is not None:
        assert err["field"] == field and field in err["message"], err
    if status == 413:
        assert "4" in err["message"] and err["code"] == "payload_too_large"


def test_bad_policy_ids(client, bpe_policy_tokenizer_dir):
    tok = str(bpe_policy_tokenizer_dir)
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(tok)("hello there", add_special_tokens=False)["input_ids"]
    for bad_ids in ([10**6], ids):  # out of vocab; decodes to something other than the response
        err = _post(client, {"items": [_item(response_token_ids=bad_ids)], "policy_tokenizer": tok}, 422)["error"]
        assert err["field"] == "items[0].response_token_ids" and err["field"] in err["message"], err


def test_invalid_json(client):
    r = client.post("/v1/dense_rewards", content=b'{"items": [', headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "body", r.text


def test_token_limits(client, encoder_rm_dir):
    long = " ".join(["the movie was wonderful"] * 15)  # > 48 RM tokens
    assert _n_rm_tokens(encoder_rm_dir, long) > LIMITS["max_response_tokens"]
    err = _post(client, {"items": [_item(response=long)]}, 413)["error"]
    assert err["field"] == "items[0].response" and "48" in err["message"], err
    medium = " ".join(["the movie was wonderful"] * 10)
    n = _n_rm_tokens(encoder_rm_dir, medium)
    assert n <= LIMITS["max_response_tokens"] and 4 * n > LIMITS["max_total_tokens"]
    err = _post(client, {"items": [_item(response=medium)] * 4}, 413)["error"]
    assert err["field"] == "items" and "120" in err["message"], err


def test_body_too_large(client):
    r = client.post("/v1/dense_rewards", json={"items": [_item(prompt="x" * (MAX_BODY + 1000))]})
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large", r.text
    # Without Content-Length (chunked transfer) the body is counted as it arrives.
    body = json.dumps({"items": [_item(prompt="x" * (MAX_BODY + 1000))]}).encode()
    chunks = (body[i : i + 65536] for i in range(0, len(body), 65536))
    r = client.post("/v1/dense_rewards", content=chunks, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["field"] == "body", r.text


# ---------------------------------------------------------------------------------------------------- concurrency, bind
def test_health_answers_during_long_request(client, server):
    slow = {"items": [_item(response=" ".join(["the movie was wonderful"] * 10))], "weights": {"lime": 1},
            "methods": {"lime": {"num_samples": 3000}}}
    done = {}
    worker = threading.Thread(target=lambda: done.update(r=client.post("/v1/dense_rewards", json=slow)))
    worker.start()
    overlapped = 0
    try:
        while worker.is_alive():
            started = time.monotonic()
            assert httpx.get(f"{server[0]}/healthz", timeout=2).status_code == 200
            assert time.monotonic() - started < 2
            # Ordering, not timing: only a check answered while the explanation still runs proves anything.
            overlapped += worker.is_alive()
            time.sleep(0.05)
    finally:
        worker.join(timeout=120)
    assert overlapped > 0, "the slow request finished before any health check; make it slower"
    assert done["r"].status_code == 200, done["r"].text


def _connects(host, port) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((host, port)) == 0


def test_default_bind_and_causal_rm(servers, monkeypatch):
    from service.config import Settings

    monkeypatch.delenv("TOKENCREDIT_HOST", raising=False)
    assert Settings().host == "127.0.0.1"
    url, port = servers["causal"]  # started without --host: the default bind
    assert _connects("127.0.0.1", port)
    assert not _connects("127.0.0.2", port), "server listens beyond 127.0.0.1"
    with httpx.Client(base_url=url, timeout=120) as c:
        weights = {"sparse": 0.1, "attention": 0.3, "lime": 0.3, "loo": 0.3}
        out = _post(c, {"items": [ITEM], "weights": weights, "methods": {"lime": {"num_samples": 64}}})
    assert out["model"]["kind"] == "causal"
    assert_conserved(out["results"][0]["token_rewards"], out["results"][0]["score"])


def test_fixture_binds_loopback_only(server):
    assert _connects("127.0.0.1", server[1]) and not _connects("127.0.0.2", server[1])
