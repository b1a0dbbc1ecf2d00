"""verl 0.9.1's own reward-consuming code with the TokenCredit adapter, against a live service: the values in
verl's reward tensors equal the service's `token_rewards` (verl's layout has no index shift: reward k on response
token k).

The harness (`tests/trainer_envs/verl_harness.py`) runs in `.venv-verl` (the real verl wheel; `make` builds it,
and a venv that cannot be built fails these tests). It drives verl's default agent-loop path: the documented
`agent_loop_manager_class` loaded as verl loads it, verl's reward-loop worker loading `DenseRewardManager` with the
kwargs verl passes, its single-turn agent loop, post-processing and `extract_reward`. The service runs a Llama RM
whose tokenizer has a chat template, so the conversation (`raw_prompt`) is rendered with it.
"""

from __future__ import annotations

import json

import pytest

from tests.support import CHEAP, running_server
from tests.trainer_envs import run_harness, trainer_python
from tokencredit import Client

# The first test may build the trainer venv (minutes on a busy machine; `make test` builds it before pytest).
pytestmark = pytest.mark.timeout(1800)

PROMPTS = [
    [{"role": "user", "content": "Tell me about the movie."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "How was your weekend?"}],
]
PLAIN_PROMPTS = ["Tell me about the movie.", "How was your weekend?"]
RESPONSES = [" The movie was wonderful and the acting was superb.", " It was awful, everything went wrong."]


@pytest.fixture(scope="module")
def service(llama_chat_rm_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("verl-service") / "server.log"
    with running_server(llama_chat_rm_dir, log, weights=json.dumps(CHEAP)) as url:
        yield url


@pytest.fixture(scope="module")
def report(service, tmp_path_factory):
    python = trainer_python(".venv-verl")
    config = {"url": service, "prompts": PROMPTS, "plain_prompts": PLAIN_PROMPTS, "responses": RESPONSES}
    return run_harness(python, "verl_harness.py", config, tmp_path_factory.mktemp("verl"))


@pytest.fixture(scope="module")
def policy(report):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(report["policy_dir"])


def _expected(url, tokenizer, items):
    with Client(url) as tc:
        return tc.dense_rewards(items, tokenizer=tokenizer)


def test_verl_version(report):
    assert report["verl"] == "0.9.1"


def test_dense_agent_loop_rm_scores_are_the_token_rewards(service, report, policy):
    out = report["dense_agent_loop"]
    assert out["manager"] == "DenseRewardManager"  # built by verl's load_reward_manager with its kwargs
    assert out["worker_pickled_by_reference"]  # Ray actors rebuild DenseAgentLoopWorker by importing the adapter
    items, lengths = [], []
    for b, (prompt, text) in enumerate(zip(PROMPTS, RESPONSES)):
        n = sum(out["response_mask"][b])
        ids = out["responses"][b][:n]
        assert policy.decode(ids, skip_special_tokens=True) == text and ids[-1] == policy.eos_token_id
        items.append({"messages": prompt + [{"role": "assistant", "content": text}], "response_token_ids": ids})
        lengths.append(n)
    expected = _expected(service, policy, items)
    for b, (n, want) in enumerate(zip(lengths, expected)):
        row = out["rm_scores"][b]
        assert row[:n] == pytest.approx(want.token_rewards, abs=1e-6)  # reward k on response token k
        assert all(v == 0 for v in row[n:])  # padding
        assert sum(row) == pytest.approx(want.score, abs=1e-4)
        assert out["tokencredit_score"][b] == pytest.approx(want.score, abs=1e-6)
    # Per-token values, not a scalar at the last token (verl's stock layout).
    assert sum(1 for v in out["rm_scores"][0] if v != 0) > 2


def test_scalar_compute_score_scores_the_conversation(service, report):
    out = report["scalar_compute_score"]
    assert out["manager"] == "NaiveRewardManager"  # verl's stock manager calling our async compute_score
    with Client(service) as tc:
        expected = tc.scores([{"messages": p + [{"role": "assistant", "content": r}]} for p, r in zip(PROMPTS, RESPONSES)])
    for b, want in enumerate(expected):
        last = sum(out["response_mask"][b]) - 1
        row = out["rm_scores"][b]
        assert row[last] == pytest.approx(want, abs=1e-5) and sum(abs(v) for v in row) == pytest.approx(abs(row[last]))


def test_legacy_batch_managers(service, report, policy):
    out = report["legacy_sync"]
    with Client(service) as tc:
        scores = tc.scores([{"prompt": p, "response": r} for p, r in zip(PLAIN_PROMPTS, RESPONSES)])
    dense = _expected(service, policy, [{"prompt": p, "response_token_ids": ids}
                                        for p, ids in zip(PLAIN_PROMPTS, out["response_ids"])])
    for b, (n, score, want) in enumerate(zip(out["valid"], scores, dense)):
        # compute_score_sync under verl's legacy NaiveRewardManager: the score at the last valid token.
        assert out["reward_tensor"][b][n - 1] == pytest.approx(score, abs=1e-5)
        # LegacyDenseRewardManager: the token rewards on the response tokens.
        assert out["dense_tensor"][b][:n] == pytest.approx(want.token_rewards, abs=1e-6)
        assert all(v == 0 for v in out["dense_tensor"][b][n:])
