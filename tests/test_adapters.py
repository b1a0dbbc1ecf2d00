"""OpenRLHF and verl adapters without the trainers: the tensor layouts and shaping term (torch only), the prompt
handling, and the scalar tiers against the live service. The trainers' own code runs in
tests/test_adapters_verl.py and tests/test_adapters_openrlhf.py."""

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


def test_openrlhf_shaping_term_is_zero_sum_and_moves_the_score_off_the_last_action():
    # Two samples, A = 6; sample 1 has a tool observation (mask 0) inside its actions.
    dense = torch.tensor([[0.0, 0.5, -0.25, 1.0, 0.0, 0.0], [0.2, 0.3, 0.0, 0.5, 0.0, 0.0]])
    mask = torch.tensor([[0, 1, 1, 1, 0, 0], [1, 1, 0, 1, 0, 0]])
    s = openrlhf.shaping_term(dense, mask)
    assert torch.allclose(s.sum(dim=1), torch.zeros(2), atol=1e-7)  # the sequence's return is unchanged
    assert s[0].tolist() == pytest.approx([0, 0.5, -0.25, 1.0 - 1.25, 0, 0])  # score 1.25 leaves the last action
    assert s[1].tolist() == pytest.approx([0.2, 0.3, 0, 0.5 - 1.0, 0, 0])
    # Stock OpenRLHF puts the (baselined) scalar at the last action: together they give the token rewards back.
    last = torch.zeros_like(dense)
    last[0, 3], last[1, 3] = 1.25, 1.0
    assert torch.allclose(last + s, dense)


def test_openrlhf_conversation_of_reads_a_chat_rendering_back(bpe_policy_tokenizer_dir):
    from transformers import AutoTokenizer

    from tests.tiny_models import CHATML_TEMPLATE

    tok = AutoTokenizer.from_pretrained(str(bpe_policy_tokenizer_dir))
    assert openrlhf.conversation_of("<|im_start|>user\nHi<|im_end|>\n", tok) is None  # no chat template
    tok.chat_template = CHATML_TEMPLATE  # adds a default system turn when there is none, as SmolLM2's does
    chat = [{"role": "user", "content": "Hi there."}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Tell me\nabout it."}]
    prompt = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert openrlhf.conversation_of(prompt, tok) == [{"role": "system", "content": "You are a helpful assistant."}] + chat
    assert openrlhf.conversation_of("Tell me about the movie.", tok) is None  # plain-text data stays text
    assert openrlhf.conversation_of(prompt[:-3], tok) is None  # not a generation prompt


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

        non_tensor_batch = {}

    verl._sync_client = Client(url, weights=CHEAP)  # cheap weights: the module's own client uses the server's
    scores, [score] = verl._dense(Proto(), tok)
    assert scores.shape == (1, R) and torch.all(scores[0, len(resp_ids):] == 0)
    [expected] = asyncio.run(_score(url, ITEM["prompt"], ITEM["response"]))
    assert math.isclose(float(scores.sum()), expected, abs_tol=1e-4) and math.isclose(score, expected, abs_tol=1e-6)


def test_verl_agent_loop_mask_keeps_tool_tokens_out(url, bpe_policy_tokenizer_dir):
    """verl's streaming reward path sends no response_mask: the agent loop hands its mask over in
    `tool_extra_fields`, and tool-output tokens get no reward and are not sent as the response."""
    import numpy as np
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(bpe_policy_tokenizer_dir))
    said, tool, more = (tok(t, add_special_tokens=False)["input_ids"] for t in (" The movie was", " [tool: 42]", " wonderful."))
    ids = said + tool + more
    mask = [1] * len(said) + [0] * len(tool) + [1] * len(more)
    prompt = [{"role": "user", "content": "Tell me about the movie.", "loss_mask": 1}]  # verl-only keys are dropped

    class Proto:
        batch = {"prompts": torch.tensor([[5, 6]]), "responses": torch.tensor([ids]),
                 "attention_mask": torch.ones(1, 2 + len(ids), dtype=torch.long)}
        non_tensor_batch = {"raw_prompt": np.array([prompt], dtype=object),
                            "tool_extra_fields": np.array([{verl._MASK_KEY: mask}], dtype=object)}

    items, _, masks = verl._policy_items(Proto(), tok)
    assert masks[0].tolist() == mask
    assert items == [{"messages": [{"role": "user", "content": "Tell me about the movie."},
                                   {"role": "assistant", "content": " The movie was wonderful."}],
                      "response_token_ids": said + more}]
    verl._sync_client = Client(url, weights=CHEAP)
    rows, [score] = verl._dense(Proto(), tok)
    assert torch.all(rows[0, len(said): len(said) + len(tool)] == 0) and math.isclose(float(rows.sum()), score, abs_tol=1e-4)


async def _score(url, prompt, response):
    from tokencredit import AsyncClient

    async with AsyncClient(url) as tc:
        return await tc.scores([{"prompt": prompt, "response": response}])


def test_verl_compute_score_live(url):
    out = asyncio.run(verl.compute_score("demo", ITEM["response"], None, extra_info={"prompt": ITEM["prompt"]}))
    [expected] = asyncio.run(_score(url, ITEM["prompt"], ITEM["response"]))
    assert out == {"score": pytest.approx(expected)}
    assert verl.compute_score_sync("demo", ITEM["response"], None, extra_info={"prompt": ITEM["prompt"]}) == out


def test_verl_score_item_prefers_the_conversation():
    raw = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi", "loss_mask": 1}]
    assert verl._score_item("Hello!", {"raw_prompt": raw, "prompt": "ignored"}) == {"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"}]}
    assert verl._score_item("Hello!", {"prompt": "Hi"}) == {"prompt": "Hi", "response": "Hello!"}
    assert verl._score_item("Hello!", None) == {"prompt": "", "response": "Hello!"}
