"""TRL: real GRPO steps (tiny GPT-2 chat policy on CPU, a conversational dataset) against the live service, with the
scalar reward function and the dense trainer; the per-token values inside TRL's own tensors are compared with the
service's answer for the same completions. `make test` runs this file with the lowest TRL we support
(`.venv-trl-min`) and the highest (`.venv`)."""

from __future__ import annotations

import asyncio
import math
import sys

import pytest

from tests.support import CHEAP, live_server
from tokencredit import Client, Retry
from tokencredit.adapters import trl as trl_adapter

PROMPTS = [
    [{"role": "user", "content": "How was the movie?"}],
    [{"role": "user", "content": "What a waste of"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Rate the acting."}]}],
    [{"role": "user", "content": "Tell me about your weekend."}],
]

# The GRPO dataset: Arrow needs one content type per column, and the policy's template concatenates strings.
CHAT_DATASET = [PROMPTS[0], PROMPTS[1], [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Rate it."}],
                PROMPTS[3]]


@pytest.fixture(scope="module")
def url(encoder_rm_dir, tmp_path_factory):
    return live_server(encoder_rm_dir, tmp_path_factory.mktemp("trl"))


def test_module_does_not_import_trl():
    import subprocess

    code = "import sys, tokencredit.adapters.trl, tokencredit.adapters.openrlhf, tokencredit.adapters.verl; " \
           "print(any(m in sys.modules for m in ('trl', 'openrlhf', 'verl', 'torch')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr


def test_chat_messages_keep_roles_blocks_and_tool_calls():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color?"}]},
        {"role": "assistant", "content": None, "reasoning_content": "think",
         "tool_calls": [{"type": "function", "function": {"name": "look", "arguments": {"where": "sky"}}}]},
        {"role": "tool", "name": "look", "content": "blue"},
    ]
    out = trl_adapter.chat_messages(messages)
    assert out[1]["content"] == [{"type": "text", "text": "What color?"}]  # the image block is dropped, no repr
    assert out[2] == {"role": "assistant", "content": None,
                      "tool_calls": [{"type": "function", "function": {"name": "look", "arguments": '{"where": "sky"}'}}]}
    assert out[3] == {"role": "tool", "content": "blue", "name": "look"}
    item = trl_adapter.reward_item(messages[:2], messages[2:] + [{"role": "assistant", "content": "Blue."}])
    assert item["messages"][-1] == {"role": "assistant", "content": "Blue."} and len(item["messages"]) == 5
    # Nothing to score: an answer that is still a tool call, or an empty one.
    assert trl_adapter.reward_item(messages[:2], messages[2:3]) is None
    assert trl_adapter.reward_item("p", "   ") is None
    with pytest.raises(ValueError, match="role"):
        trl_adapter.chat_messages([{"role": "narrator", "content": "x"}])


def test_dense_items_answer_is_the_last_generated_segment():
    # A tool-calling rollout: generated call (mask 1), tool result (mask 0), generated answer (mask 1).
    ids = [[10, 11, 12, 20, 21, 30, 31, 32]]
    tool_mask = [[1, 1, 1, 0, 0, 1, 1, 1]]
    prompt = [{"role": "user", "content": "q"}]
    completion = [[{"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]},
                   {"role": "tool", "content": "r"}, {"role": "assistant", "content": "parsed"}]]
    items, starts = trl_adapter.dense_items([prompt], completion, ids, tool_mask, lambda x: "".join(chr(65 + i % 26) for i in x))
    assert starts == [5] and items[0]["response_token_ids"] == [30, 31, 32]
    assert [m["role"] for m in items[0]["messages"]] == ["user", "assistant", "tool", "assistant"]
    assert items[0]["messages"][-1]["content"] == "EFG"  # the decoding of the ids, not TRL's parsed text


def test_shaping_advantages_are_group_relative():
    import torch

    dense = torch.tensor([[1.0, 2.0, 3.0, 0.0], [3.0, 3.0, 0.0, 0.0], [-1.0, 0.5, 0.0, 0.0], [0.2, 0.2, 0.2, 0.2]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    adv = trl_adapter.shaping_advantages(dense, mask, group_size=2)
    assert torch.all(adv[mask == 0] == 0)
    for g in (slice(0, 2), slice(2, 4)):  # zero mean, unit std within each prompt's group
        valid = adv[g][mask[g] == 1]
        assert abs(float(valid.mean())) < 1e-5 and abs(float(valid.std(unbiased=False)) - 1) < 1e-3
    assert float(adv[0, 0]) > float(adv[0, 1]) > float(adv[0, 2])  # reward-to-go decreases along a positive row
    # A group whose completions all score high gets no blanket bonus: shifting every reward of a group by a constant
    # per token changes nothing once the returns are standardised within it.
    shifted = trl_adapter.shaping_advantages(dense + 10.0 * (torch.arange(4) < 2).float().unsqueeze(1), mask, 2)
    assert torch.allclose(shifted[2:], adv[2:])
    with pytest.raises(ValueError, match="groups"):
        trl_adapter.shaping_advantages(dense[:3], mask[:3], group_size=2)


def test_reward_func_sends_conversations(url):
    from tokencredit import AsyncClient

    completions = [[{"role": "assistant", "content": "It was wonderful."}], [{"role": "assistant", "content": "  "}],
                   [{"role": "assistant", "content": [{"type": "text", "text": "Superb acting."}]}],
                   [{"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]}]]
    reward = trl_adapter.make_reward_func(AsyncClient(url), name="tc")
    got = asyncio.run(reward(prompts=PROMPTS, completions=completions))
    assert got[1] is None and got[3] is None  # nothing to score: TRL turns None into NaN and gives no advantage
    with Client(url) as tc:
        expected = tc.scores([{"messages": trl_adapter.chat_messages(PROMPTS[0] + completions[0])},
                              {"messages": [{"role": "system", "content": "Be brief."},
                                            {"role": "user", "content": [{"type": "text", "text": "Rate the acting."}]},
                                            {"role": "assistant", "content": "Superb acting."}]}])
        # The roles are read: the same texts as one flattened prompt score differently.
        flat = tc.scores([{"prompt": "How was the movie?", "response": "It was wonderful."}])
    # (Scores of one item in batches of different sizes differ by float rounding of the padded forward pass.)
    assert got[0] == pytest.approx(expected[0], abs=1e-5) and got[2] == pytest.approx(expected[1], abs=1e-5)
    assert abs(flat[0] - got[0]) > 1e-3


def _chat_policy(tmp_path):
    import torch
    from tokenizers import AddedToken
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from tests.tiny_models import CHATML_TEMPLATE, _bytelevel_bpe_tokenizer

    backend = _bytelevel_bpe_tokenizer(vocab_size=280)
    backend.add_special_tokens([AddedToken("<|im_start|>", special=True), AddedToken("<|im_end|>", special=True)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|im_end|>",
                                  unk_token="<|endoftext|>")
    tok.chat_template = CHATML_TEMPLATE
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tok), n_layer=2, n_embd=32, n_head=4, n_positions=128,
                        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return GPT2LMHeadModel(config), tok


class CountingClient(Client):
    """The real client, recording what each call asked the service for."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = []

    def dense_rewards(self, items, **kwargs):
        self.calls.append(("dense", len(items), kwargs.get("weights")))
        return super().dense_rewards(items, **kwargs)

    def scores(self, items, **kwargs):
        self.calls.append(("scores", len(items), None))
        return super().scores(items, **kwargs)


def test_dense_grpo_step_on_a_conversational_dataset(url, tmp_path):
    import torch
    from datasets import Dataset
    from trl import GRPOConfig

    from tokencredit.tokens import decoder_for

    model, tok = _chat_policy(tmp_path)
    dataset = Dataset.from_dict({"prompt": CHAT_DATASET})
    args = GRPOConfig(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=2, max_completion_length=8,
        max_steps=1, use_cpu=True, report_to="none", logging_steps=1, save_strategy="no", bf16=False,
        temperature=1.0, disable_tqdm=True, per_device_eval_batch_size=4, seed=0,
    )
    client = CountingClient(url, on_error="raise", retry=Retry(attempts=2, base_delay=0.01))
    trainer = trl_adapter.DenseGRPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tok,
                                           tokencredit=client, dense_coef=0.1, dense_weights=CHEAP)
    seen = {}
    call_service, score_step = trainer._call_service, trainer._generate_and_score_completions
    outcome_func = trainer.reward_funcs[0]

    def spy_call(prompts, completions, completion_ids, tool_mask, training):
        seen["generated"] = (prompts, completions, [list(c) for c in completion_ids], tool_mask)
        return call_service(prompts, completions, completion_ids, tool_mask, training)

    def spy_outcome(*a, **kw):
        seen["outcome"] = outcome_func(*a, **kw)
        return seen["outcome"]

    def spy_step(inputs):
        out = score_step(inputs)
        seen.setdefault("outputs", []).append(out)
        return out

    trainer._call_service, trainer._generate_and_score_completions = spy_call, spy_step
    trainer.reward_funcs[0] = spy_outcome
    result = trainer.train()
    assert trainer.state.global_step == 1 and math.isfinite(result.training_loss)
    # One service call for the step's 4 completions: the dense one, whose score is the outcome reward.
    assert [c[0] for c in client.calls] == ["dense"] and client.calls[0][1] >= 1

    out = seen["outputs"][0]
    prompts, completions, completion_ids, tool_mask = seen["generated"]
    items, starts = trl_adapter.dense_items(prompts, completions, completion_ids, tool_mask, decoder_for(tok))
    scorable = [k for k, it in enumerate(items) if it is not None]
    assert scorable, "no completion could be scored"
    with Client(url) as fresh:
        expected = fresh.dense_rewards([items[k] for k in scorable], tokenizer=tok, weights=CHEAP)
    dense, mask, adv = out["token_rewards"], out["completion_mask"], out["advantages"]
    for k, r in zip(scorable, expected):
        n = len(completion_ids[k])
        # GRPO's documented layout: reward k of the answer on completion column start + k (no shift).
        assert dense[k, starts[k]:starts[k] + n].tolist() == pytest.approx(r.token_rewards, abs=1e-6)
        assert torch.all(dense[k, starts[k] + n:] == 0)
        # Σ dense = the outcome reward TRL normalised (one call, so the same RM input and the same number).
        assert seen["outcome"][k] == pytest.approx(math.fsum(r.token_rewards), abs=1e-5)
    # advantages = TRL's own group advantage (constant along a row) + λ · the group-relative shaping term.
    has = torch.tensor([[1.0] if it is not None else [0.0] for it in items])
    shaping = trl_adapter.shaping_advantages(dense, mask * has, group_size=2)
    outcome = adv - 0.1 * shaping
    logged = list(trainer._logs["advantages"])[-len(items):]
    for i in range(len(items)):
        valid = outcome[i][mask[i].bool()]
        assert torch.allclose(valid, torch.full_like(valid, logged[i]), atol=1e-5)
    assert bool((shaping * mask).abs().sum() > 0)
    logged_keys = {k for entry in trainer.state.log_history for k in entry}
    assert {"rewards/tokencredit/mean", "tokencredit/dense_items", "tokencredit/wait_s"} <= logged_keys, logged_keys

    # Eval: the score only (a scalar call), no dense explanation and no shaping.
    client.calls.clear()
    trainer.evaluate(eval_dataset=dataset)
    assert client.calls and all(kind == "scores" for kind, _, _ in client.calls), client.calls
    client.close()


def test_dense_grpo_step_with_step_rewards(url, tmp_path):
    from datasets import Dataset
    from trl import GRPOConfig

    from tokencredit.results import step_tensor
    from tokencredit.tokens import decoder_for

    model, tok = _chat_policy(tmp_path)
    args = GRPOConfig(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=2, max_completion_length=8,
        max_steps=1, use_cpu=True, report_to="none", save_strategy="no", bf16=False, disable_tqdm=True, seed=1,
    )
    client = Client(url, retry=Retry(attempts=2, base_delay=0.01))
    # A one-character separator that random completions contain: several steps per completion.
    steps = {"steps": {"regex": r"\s"}}
    trainer = trl_adapter.DenseGRPOTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"prompt": CHAT_DATASET}),
                                           processing_class=tok, tokencredit=client, dense_weights=CHEAP, aggregate=steps)
    seen = {}
    call_service, score_step = trainer._call_service, trainer._generate_and_score_completions

    def spy_call(prompts, completions, completion_ids, tool_mask, training):
        seen["generated"] = (prompts, completions, [list(c) for c in completion_ids], tool_mask)
        return call_service(prompts, completions, completion_ids, tool_mask, training)

    trainer._call_service = spy_call
    trainer._generate_and_score_completions = lambda inputs: seen.setdefault("out", score_step(inputs))
    trainer.train()
    prompts, completions, completion_ids, tool_mask = seen["generated"]
    items, starts = trl_adapter.dense_items(prompts, completions, completion_ids, tool_mask, decoder_for(tok))
    scorable = [k for k, it in enumerate(items) if it is not None]
    with Client(url) as fresh:
        expected = fresh.dense_rewards([items[k] for k in scorable], tokenizer=tok, weights=CHEAP, aggregate=steps)
    assert any(len(r.steps) > 1 for r in expected), "no completion had more than one step"
    dense = seen["out"]["token_rewards"]
    for k, r in zip(scorable, expected):
        n = len(completion_ids[k])
        # PRM layout: each step's reward on its last token, 0 elsewhere; the row still sums to the score.
        assert dense[k, starts[k]:starts[k] + n].tolist() == pytest.approx(step_tensor([r], n)[0].tolist(), abs=1e-6)
        assert float(dense[k].sum()) == pytest.approx(r.score, abs=1e-5)
    client.close()
