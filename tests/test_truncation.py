"""Long inputs: the scalar shims cut them as OpenRLHF's own RM server does (the start of the response is scored),
count the cuts in /metrics and flag them in the answer; the dense endpoint cuts a long prompt from the left unless
`truncation: "error"`."""

from __future__ import annotations

import re

import httpx
import pytest

from tests.support import LIMITS, live_server
from tests.tiny_models import CORPUS

PROMPT = "Tell me about the movie."


@pytest.fixture(scope="module")
def http(encoder_rm_dir, tmp_path_factory):
    url = live_server(encoder_rm_dir, tmp_path_factory.mktemp("truncation"))
    with httpx.Client(base_url=url, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def rm_tokenizer(encoder_rm_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(encoder_rm_dir))


def _long_response(tokenizer, n_tokens=2000):
    text = ""
    while len(tokenizer(text, add_special_tokens=False)["input_ids"]) < n_tokens:
        text += " " + " ".join(CORPUS[:4])
    return text


def _truncated_total(http, endpoint, part):
    metrics = http.get("/metrics").text
    m = re.search(rf'tokencredit_truncated_total{{endpoint="{re.escape(endpoint)}",part="{part}"}} ([0-9.e+]+)', metrics)
    return float(m.group(1)) if m else 0.0


def _score(http, prompt, response):
    body = {"items": [{"prompt": prompt, "response": response}], "weights": {"sparse": 1.0}}
    r = http.post("/v1/dense_rewards", json=body)
    assert r.status_code == 200, r.text
    return r.json()["results"][0]["score"]


def test_a_2000_token_response_gets_a_reward_flagged_not_413(http, rm_tokenizer):
    response = _long_response(rm_tokenizer)
    assert len(rm_tokenizer(response, add_special_tokens=False)["input_ids"]) >= 2000
    before = _truncated_total(http, "/openrlhf/get_reward", "response")
    r = http.post("/openrlhf/get_reward", json={"query": [PROMPT + response], "prompts": [PROMPT], "labels": [None]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["extra_logs"]["truncated"] == [1.0]
    # The RM scored the start of the response: its first max_response_tokens RM tokens, as OpenRLHF's serve_rm keeps
    # them (truncation=True on the right).
    offsets = rm_tokenizer(response, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    start = response[: offsets[LIMITS["max_response_tokens"] - 1][1]]
    assert body["rewards"] == body["scores"] == [pytest.approx(_score(http, PROMPT, start), abs=1e-6)]
    assert _truncated_total(http, "/openrlhf/get_reward", "response") == before + 1


def test_short_queries_are_not_flagged_and_batches_fit_the_token_limit(http, rm_tokenizer):
    long = _long_response(rm_tokenizer, 300)
    # 6 long responses hold 6 × 64 RM tokens after the cut, more than max_total_tokens (256) in one engine request.
    queries = [PROMPT + " Great film.", PROMPT + long] * 3
    r = http.post("/openrlhf/get_reward", json={"query": queries, "prompts": [PROMPT] * 6})
    assert r.status_code == 200, r.text
    assert r.json()["extra_logs"]["truncated"] == [0.0, 1.0] * 3
    assert len(set(r.json()["rewards"][1::2])) == 1


def test_classify_cuts_and_flags(http, rm_tokenizer):
    before = _truncated_total(http, "/classify", "response")
    r = http.post("/classify", json={"input": [_long_response(rm_tokenizer), "Great film."]})
    assert r.status_code == 200, r.text
    assert [d["truncated"] for d in r.json()["data"]] == [True, False]
    assert _truncated_total(http, "/classify", "response") == before + 1


def test_dense_endpoint_truncation_option(http, rm_tokenizer):
    long_prompt = _long_response(rm_tokenizer, 400)
    item = {"prompt": long_prompt, "response": "It was wonderful."}
    r = http.post("/v1/dense_rewards", json={"items": [item], "weights": {"sparse": 1.0}})
    assert r.status_code == 200 and r.json()["results"][0]["prompt_truncated"] is True  # the default: left_prompt
    r = http.post("/v1/dense_rewards", json={"items": [item], "weights": {"sparse": 1.0}, "truncation": "error"})
    assert r.status_code == 413 and r.json()["error"]["field"] == "items[0].prompt", r.text
    r = http.post("/v1/dense_rewards", json={"items": [item], "weights": {"sparse": 1.0}, "truncation": "right"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "truncation"
    # A short item passes under "error"; a response too long for the RM is 413 either way (every token is owed a reward).
    ok = {"items": [{"prompt": PROMPT, "response": "Fine."}], "weights": {"sparse": 1.0}, "truncation": "error"}
    assert http.post("/v1/dense_rewards", json=ok).status_code == 200
    long = {"items": [{"prompt": PROMPT, "response": _long_response(rm_tokenizer, 100)}], "weights": {"sparse": 1.0}}
    assert http.post("/v1/dense_rewards", json=long).status_code == 413
