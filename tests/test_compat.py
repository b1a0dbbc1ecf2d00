"""The compatibility shims on the live service: OpenRLHF's `/openrlhf/get_reward` byte for byte (empty lists
included) and vLLM-style `/classify`."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.support import live_server

PROMPT = "Tell me about the movie."
RESPONSE = " The movie was wonderful and the acting was superb."


@pytest.fixture(scope="module")
def http(encoder_rm_dir, tmp_path_factory):
    url = live_server(encoder_rm_dir, tmp_path_factory.mktemp("compat"))
    with httpx.Client(base_url=url, timeout=120) as client:
        yield client


def _score(http, prompt, response):
    body = {"items": [{"prompt": prompt, "response": response}], "weights": {"sparse": 1.0}}
    return http.post("/v1/dense_rewards", json=body).json()["results"][0]["score"]


def test_openrlhf_empty_lists_exact_bytes(http):
    # OpenRLHF ≥ v0.9.1 sends empty lists to every URL but the first; its own serve_rm answers them with a 500.
    r = http.post("/openrlhf/get_reward", json={"query": [], "prompts": [], "labels": []})
    assert r.status_code == 200
    assert r.content == b'{"rewards":[],"scores":[],"extra_logs":{"rm_score":[],"truncated":[]}}'


def test_openrlhf_one_sample_exact_bytes(http):
    score = _score(http, PROMPT, RESPONSE)
    r = http.post("/openrlhf/get_reward", json={"query": [PROMPT + RESPONSE], "prompts": [PROMPT], "labels": [None]})
    assert r.status_code == 200, r.text
    expected = json.dumps({"rewards": [score], "scores": [score], "extra_logs": {"rm_score": [score], "truncated": [0.0]}},
                          separators=(",", ":")).encode()
    assert r.content == expected


def test_openrlhf_batch_split_and_no_prompts(http):
    # Older OpenRLHF sends whole batches: more than max_items (8) are scored in chunks, order kept.
    queries = [PROMPT + RESPONSE, "The film was terrible, boring and far too long."] * 5
    r = http.post("/openrlhf/get_reward", json={"query": queries})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["rewards"]) == 10 and body["rewards"][0] == body["rewards"][2] != body["rewards"][1]
    # Scored in a batch of 8 (shared padded pass) vs alone: fp32 rounding apart (docs/architecture.md).
    assert body["rewards"][1] == pytest.approx(_score(http, "", queries[1]), rel=1e-5)


def test_openrlhf_errors(http):
    r = http.post("/openrlhf/get_reward", json={"query": ["a b", "c d"], "prompts": ["a"]})
    assert r.status_code == 422 and r.json()["error"]["field"] == "prompts"
    r = http.post("/openrlhf/get_reward", json={"query": [PROMPT + "   "], "prompts": [PROMPT]})
    assert r.status_code == 422 and r.json()["error"]["field"] == "query[0]"


def test_classify(http):
    r = http.post("/classify", json={"model": "rm", "input": RESPONSE, "use_activation": False})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["model"] == "rm"
    [data] = body["data"]
    assert data["index"] == 0 and data["num_classes"] == 1
    assert data["probs"] == [pytest.approx(_score(http, "", RESPONSE))]  # verl reads data[-1]["probs"][-1]
    many = http.post("/classify", json={"input": [RESPONSE, "Awful."], "use_activation": True}).json()
    assert [d["index"] for d in many["data"]] == [0, 1] and all(0 < d["probs"][0] < 1 for d in many["data"])
    bad = http.post("/classify", json={"input": ["ok", "  "]})
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "input[1]"
