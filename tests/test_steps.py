"""Step-level rewards (`aggregate.steps`): the pure split and sum in workers/shaping.py, then the live endpoint and
the SDK (conservation, spans covering the response, the rule for tokens that straddle a separator, 422s)."""

from __future__ import annotations

import math
import random
import re

import httpx
import pytest

from tests.support import CHEAP, live_server
from workers.shaping import step_rewards, step_spans, token_steps

SOLUTION = "First, add 2 and 3.\n\nThen double it: 10.\n\nSo the answer is 10."


def _covers(spans, n):
    return spans[0][0] == 0 and spans[-1][1] == n and all(a[1] == b[0] for a, b in zip(spans, spans[1:])) \
        and all(s < e for s, e in spans)


def test_spans_cover_the_response_and_separators_end_their_step():
    spans = step_spans(SOLUTION, separator="\n\n")
    assert _covers(spans, len(SOLUTION)) and len(spans) == 3
    assert [SOLUTION[s:e] for s, e in spans] == ["First, add 2 and 3.\n\n", "Then double it: 10.\n\n", "So the answer is 10."]
    # A separator at the very start is a step of its own; one at the end leaves no empty step after it.
    assert step_spans("\n\nA\n\n", separator="\n\n") == [(0, 2), (2, 5)]
    assert step_spans("no separator", separator="\n\n") == [(0, 12)]
    # A regex step boundary may be zero-width: each "Step k:" opens a step.
    text = "Step 1: a. Step 2: b."
    assert [text[s:e] for s, e in step_spans(text, pattern=re.compile(r"(?=Step \d)"))] == ["Step 1: a. ", "Step 2: b."]


def test_a_token_goes_to_the_step_of_its_first_character():
    steps = step_spans("ab.\n\ncd", separator="\n\n")  # [(0, 5), (5, 7)]
    # ".\n\n" starts in step 0; "\n\nc" would start in step 0 too although most of it is in step 1; "d" is in step 1.
    assert token_steps([(0, 2), (2, 5), (5, 6), (6, 7)], steps) == [0, 0, 1, 1]
    assert token_steps([(0, 2), (3, 6), (6, 7)], steps) == [0, 0, 1]
    # A token without characters (a special token, an EOS) stays with the character before it: an EOS at the end
    # is in the last step, a zero-width piece right after a boundary stays in the step that boundary ends.
    assert token_steps([(0, 5), (5, 5), (5, 7), (7, 7)], steps) == [0, 0, 1, 1]
    assert token_steps([(0, 0), (0, 5)], steps) == [0, 0]


def test_step_rewards_conserve_the_sum():
    rng = random.Random(0)
    for _ in range(200):
        words = [rng.choice(["a", "bb", "ccc", "\n\n", " ", "."]) for _ in range(rng.randint(1, 30))]
        text = "".join(words)
        if not text:
            continue
        spans, at = [], 0
        for w in words:  # one token per word, with now and then an empty (special) token
            spans.append((at, at + len(w)))
            at += len(w)
            if rng.random() < 0.1:
                spans.append((at, at))
        rewards = [rng.uniform(-1, 1) for _ in spans]
        steps = step_spans(text, separator="\n\n")
        out = step_rewards(rewards, spans, steps)
        assert _covers([s for s, _, _ in out], len(text))
        assert math.isclose(sum(r for _, _, r in out), math.fsum(rewards), abs_tol=1e-12)
        ranges = [t for _, t, _ in out]
        assert ranges[0][0] == 0 and ranges[-1][1] == len(rewards) and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        for _, (first, end), r in out:
            assert r == pytest.approx(math.fsum(rewards[first:end]), abs=1e-12)


@pytest.fixture(scope="module")
def url(encoder_rm_dir, tmp_path_factory):
    return live_server(encoder_rm_dir, tmp_path_factory.mktemp("steps"))


def test_endpoint_returns_steps_that_sum_to_the_score(url):
    body = {"items": [{"prompt": "What is 2 + 3, doubled?", "response": SOLUTION}], "weights": CHEAP,
            "aggregate": {"steps": {"separator": "\n\n"}}}
    r = httpx.post(f"{url}/v1/dense_rewards", json=body, timeout=120)
    assert r.status_code == 200, r.text
    result = r.json()["results"][0]
    steps = result["steps"]
    assert [tuple(s["span"]) for s in steps] == step_spans(SOLUTION, separator="\n\n")
    assert math.fsum(s["reward"] for s in steps) == pytest.approx(result["score"], abs=1e-9)
    for s in steps:
        first, end = s["tokens"]
        assert first < end and s["reward"] == pytest.approx(math.fsum(result["token_rewards"][first:end]), abs=1e-12)
        # Every RM token of the step starts inside the step's span.
        assert all(s["span"][0] <= result["spans"][k][0] < s["span"][1] for k in range(first, end))
    # Without the option there are no steps.
    del body["aggregate"]
    assert httpx.post(f"{url}/v1/dense_rewards", json=body, timeout=120).json()["results"][0]["steps"] is None


@pytest.mark.parametrize("steps, field", [
    ({"regex": "(unclosed"}, "aggregate.steps.regex"),
    ({"separator": "\n\n", "regex": "\\n"}, "aggregate.steps"),
    ({}, "aggregate.steps"),
    ({"separator": ""}, "aggregate.steps.separator"),
    # Catastrophic backtracking is stopped by the matching budget, not left to hold a thread.
    ({"regex": "(x+x+)+y"}, "aggregate.steps.regex"),
])
def test_bad_step_rules_are_422_naming_the_field(url, steps, field):
    body = {"items": [{"prompt": "p", "response": "x" * 3000}], "weights": {"sparse": 1.0}, "aggregate": {"steps": steps}}
    r = httpx.post(f"{url}/v1/dense_rewards", json=body, timeout=120)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == field, r.json()


def test_sdk_steps_on_policy_tokens(url, bpe_policy_tokenizer_dir):
    from transformers import AutoTokenizer

    from tokencredit import Client
    from tokencredit.results import step_tensor

    tok = AutoTokenizer.from_pretrained(str(bpe_policy_tokenizer_dir))
    ids = tok(SOLUTION, add_special_tokens=False)["input_ids"]
    with Client(url, weights=CHEAP) as tc:
        [r] = tc.dense_rewards([{"prompt": "What is 2 + 3, doubled?", "response_token_ids": ids}], tokenizer=tok,
                               aggregate={"steps": {"separator": "\n\n"}})
        with pytest.raises(Exception, match="aggregate"):
            tc.dense_rewards([("p", "r")], aggregate={"steps": {"regex": "("}})
    assert len(r.token_rewards) == len(ids) and len(r.steps) == 3
    assert math.fsum(s.reward for s in r.steps) == pytest.approx(r.score, abs=1e-9)
    assert r.steps[-1].tokens[1] == len(ids)
    # PRM layout: each step's reward on its last policy token.
    prm = step_tensor([r], length=len(ids))
    assert float(prm.sum()) == pytest.approx(r.score, abs=1e-5)
    for s in r.steps:
        assert float(prm[0, s.tokens[1] - 1]) == pytest.approx(s.reward, abs=1e-6)
