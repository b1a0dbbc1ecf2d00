"""OpenRLHF and verl adapters: the tensor layouts (torch only; neither trainer is installed here) and the scalar
tiers against the live service."""

from __future__ import annotations

import asyncio
import math

import pytest
import torch

from tests.support import CHEAP, live_server
from tokencredit import Client
from tokencredit.adapters import openrlhf, verl

ITEM = {"prompt": "Tell me about the movie.", "response": " The movie was wonderful and the acting was superb."}


@pytest.fixture(scope="module")
def url(encoder_rm_dir, tmp_path_factory, monkeypatch_module):
    url = live_server(encoder_rm_dir, tmp_path_factory.mktemp("adapters"))
    monkeypatch_module.setenv("TOKENCREDIT_URL", url)
    return url


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


# ---------------------------------------------------------------------------------------------------- OpenRLHF
def test_openrlhf_index_shift():
    # Sequence of T = 8 tokens: prompt at 0..2, actions at 3..5 (a tool observation at 6), action at 7.
    # A = T - 1 = 7; token at sequence position p is the action predicted at A-index p - 1.
    dense = openrlhf.place_token_rewards([[0.1, 0.2, 0.3, 0.4]], [[(3, 6), (7, 8)]], num_actions=7)
    assert dense.shape == (1, 7)
    assert dense[0].tolist() == pytest.approx([0, 0, 0.1, 0.2, 0.3, 0, 0.4])
    with pytest.raises(ValueError, match="3 token rewards for 4"):
        openrlhf.place_token_rewards([[0.1, 0.2, 0.3]], [[(3, 6), (7, 8)]], num_actions=7)
    with pytest.raises(ValueError, match="does not fit"):
        openrlhf.place_token_rewards([[0.1]], [[(8, 9)]], num_actions=7)
    kl = torch.full((1, 7), 0.5)
    mask = (dense != 0).float()
    r = openrlhf.dense_compute_reward(dense, 0.1, kl, mask)
    assert r[0, 2] == pytest.approx(0.1 - 0.05) and r[0, 0] == 0


def test_openrlhf_response_of():
    assert openrlhf.response_of("<s>User: hi\nBot: hello", "<s>User: hi\nBot:") == ("<s>User: hi\nBot:", " hello")
    assert openrlhf.response_of("no prompt match", "other") == ("", "no prompt match")


def test_openrlhf_reward_func_live(url):
    query = ITEM["prompt"] + ITEM["response"]
    out = openrlhf.reward_func([query, query], [ITEM["prompt"]] * 2, [None, None])
    assert set(out) == {"rewards", "scores", "extra_logs"}
    assert out["rewards"].shape == (2,) and torch.equal(out["rewards"], out["scores"])
    assert all(v.shape == (2,) for v in out["extra_logs"].values())  # one plain number per sample
    empty = openrlhf.reward_func([], [], [])
    assert empty["rewards"].shape == (0,)


# ---------------------------------------------------------------------------------------------------- verl
def test_verl_rm_scores_layout():
    # bs = 2, R = 6. Row 0: 4 valid tokens, token 2 is a tool token (mask 0); row 1: 2 valid tokens.
    mask = torch.tensor([[1, 1, 0, 1, 0, 0], [1, 1, 0, 0, 0, 0]])
    valid = torch.tensor([4, 2])
    out = verl.dense_rm_scores([[0.5, -0.25, 1.0], [2.0, 3.0]], mask, valid)
    assert out.shape == (2, 6) and out.dtype == torch.float32
    assert out[0].tolist() == [0.5, -0.25, 0.0, 1.0, 0.0, 0.0]
    assert out[1].tolist() == [2.0, 3.0, 0.0, 0.0, 0.0, 0.0]
    assert torch.all(out[mask == 0] == 0)
    failed = verl.dense_rm_scores([None, [2.0, 3.0]], mask, valid)
    assert torch.isnan(failed[0, [0, 1, 3]]).all() and failed[0, 2] == 0  # a failure is NaN, never a silent 0
    with pytest.raises(ValueError, match="2 token rewards for 3"):
        verl.dense_rm_scores([[1.0, 2.0], [2.0, 3.0]], mask, valid)


def test_verl_dense_from_dataproto(url, bpe_policy_tokenizer_dir):
    """The manager's path on a DataProto-like object: policy ids in, (bs, R) rm_scores out, Σ = score."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(bpe_policy_tokenizer_dir))
    prompt_ids = tok(ITEM["prompt"], add_special_tokens=False)["input_ids"]
    resp_ids = tok(ITEM["response"], add_special_tokens=False)["input_ids"]
    R, P = len(resp_ids) + 3, len(prompt_ids)
    responses = torch.full((1, R), tok.eos_token_id)
    responses[0, : len(resp_ids)] = torch.tensor(resp_ids)
    mask = torch.zeros(1, R, dtype=torch.long)
    mask[0, : len(resp_ids)] = 1

    class Proto:
        batch = {"prompts": torch.tensor([prompt_ids]), "responses": responses, "response_mask": mask,
                 "attention_mask": torch.cat([torch.ones(1, P, dtype=torch.long), mask], dim=1)}

    verl._sync_client = Client(url, weights=CHEAP)  # cheap weights: the module's own client uses the server's
    scores = verl._dense(Proto(), tok)
    assert scores.shape == (1, R) and torch.all(scores[0, len(resp_ids):] == 0)
    [expected] = asyncio.run(_score(url, ITEM["prompt"], ITEM["response"]))
    assert math.isclose(float(scores.sum()), expected, abs_tol=1e-4)


async def _score(url, prompt, response):
    from tokencredit import AsyncClient

    async with AsyncClient(url) as tc:
        return await tc.scores([{"prompt": prompt, "response": response}])


def test_verl_compute_score_live(url):
    out = asyncio.run(verl.compute_score("demo", ITEM["response"], None, extra_info={"prompt": ITEM["prompt"]}))
    [expected] = asyncio.run(_score(url, ITEM["prompt"], ITEM["response"]))
    assert out == {"score": pytest.approx(expected)}
