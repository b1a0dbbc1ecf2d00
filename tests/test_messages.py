"""Chat-aware items (`DenseRewardItem.messages`): the layout per RM kind, truncation, the wire type's 422s, the cache
key and the SDK, on real tiny RMs (the HTTP tests against a real server on loopback)."""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import httpx
import numpy as np
import pytest
import torch

from service.cache import item_cache_key, request_shared_part
from tests.support import spawn_server, stop, wait_ready
from tokencredit.types import DenseRewardItem, DenseRewardsRequest, Limits, MethodsConfig, ShapConfig, ShapingWeights
from workers.engine import Engine, InvalidField
from workers.model import RewardModel, causal_layout, plain_conversation

RESPONSE = "It is sunny, 22 degrees."
WEATHER_CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
# A tool-using conversation: system turn, content blocks, an assistant turn that only calls a tool, the tool's answer.
CONVERSATION = [
    {"role": "system", "content": "You are brief."},
    {"role": "user", "content": [{"type": "text", "text": "How is the weather "}, {"type": "text", "text": "in Paris?"}]},
    {"role": "assistant", "content": None, "tool_calls": [WEATHER_CALL]},
    {"role": "tool", "tool_call_id": "call_1", "content": "22 C, sunny"},
    {"role": "assistant", "content": [{"type": "text", "text": "It is sunny, "}, {"type": "text", "text": "22 degrees."}]},
]
# The same conversation as a chat template receives it: string content, tool-call arguments as an object.
RENDERED = [
    {"role": "system", "content": "You are brief."},
    {"role": "user", "content": "How is the weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [{**WEATHER_CALL, "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "22 C, sunny"},
    {"role": "assistant", "content": RESPONSE},
]
# Qwen2.5-style tool rendering: tool calls as <tool_call> JSON (arguments through `tojson`), tool results as a user
# turn. It shows that tool calls reach the template in the shape templates expect.
TOOLS_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'tool' %}"
    "{{ '<|im_start|>user\n<tool_response>\n' + message['content'] + '\n</tool_response><|im_end|>\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] }}"
    "{% for call in message.tool_calls or [] %}"
    "{{ '\n<tool_call>\n{\"name\": \"' + call.function.name + '\", \"arguments\": ' + (call.function.arguments | tojson) + '}\n</tool_call>' }}"
    "{% endfor %}{{ '<|im_end|>\n' }}{% endif %}{% endfor %}"
)
LIMITS = Limits(max_items=8, max_response_tokens=200, max_total_tokens=1000, max_response_chars=2000)
ALL = ShapingWeights(sparse=0.1, attention=0.2, shap=0.3, lime=0.2, loo=0.2)
FAST = MethodsConfig(shap=ShapConfig(max_rows=300, seed=1))


def _with_template(rm: RewardModel, template: str) -> RewardModel:
    tok = copy.deepcopy(rm.tokenizer)
    tok.chat_template = template
    return dataclasses.replace(rm, tokenizer=tok)


def _hf_score(rm, ids) -> float:
    """The RM's own forward and head (HF reads the last non-pad token)."""
    with torch.inference_mode():
        return float(rm.model(input_ids=torch.tensor([list(ids)])).logits[0, 0])


def _template_ids(tok, messages):
    return tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]


def _request(items, **kw):
    kw.setdefault("methods", FAST)
    return DenseRewardsRequest(items=items, **kw)


# ------------------------------------------------------------------------------------------------------ layouts
def test_chat_template_layout_is_the_template_rendering_and_the_score_the_models_own(llama_chat_rm):
    tok = llama_chat_rm.tokenizer
    inp = llama_chat_rm.encode_messages(CONVERSATION)
    assert list(inp.input_ids) == _template_ids(tok, RENDERED)
    assert tok.decode(inp.response_ids) == RESPONSE
    assert "".join(RESPONSE[a:b] for a, b in inp.response_spans) == RESPONSE
    assert tok.decode(inp.input_ids[: inp.response_start]).endswith("<|im_start|>tool\n22 C, sunny<|im_end|>\n<|im_start|>assistant\n")
    assert not inp.prompt_truncated
    engine = Engine(llama_chat_rm, LIMITS)
    result = engine.run(_request([DenseRewardItem(messages=CONVERSATION)]), ShapingWeights(sparse=1.0)).results[0]
    assert result.error is None
    assert result.score == pytest.approx(_hf_score(llama_chat_rm, inp.input_ids), abs=1e-5)
    # Spans index the last assistant message's text (the concatenated blocks).
    assert [RESPONSE[a:b] for a, b in result.spans] == [tok.decode([i]) for i in inp.response_ids]


def test_tool_calls_reach_the_template_as_objects(llama_chat_rm):
    rm = _with_template(llama_chat_rm, TOOLS_TEMPLATE)
    inp = rm.encode_messages(CONVERSATION)
    assert list(inp.input_ids) == _template_ids(rm.tokenizer, RENDERED)
    text = rm.tokenizer.decode(inp.input_ids)
    # Parsed, not a JSON string quoted again by `tojson`.
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert "<tool_response>\n22 C, sunny\n</tool_response>" in text
    # Arguments that are not a JSON object reach the template as the string sent.
    odd = copy.deepcopy(CONVERSATION)
    odd[2]["tool_calls"][0]["function"]["arguments"] = "Paris"
    assert '"arguments": "Paris"' in rm.tokenizer.decode(rm.encode_messages(odd).input_ids)


def test_a_template_that_refuses_the_conversation_is_a_422_at_messages(llama_chat_rm):
    strict = ("{% if messages[0]['role'] != 'user' %}{{ raise_exception('must open with user') }}{% endif %}"
              "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    rm = _with_template(llama_chat_rm, strict)
    engine = Engine(rm, LIMITS)
    with pytest.raises(InvalidField) as caught:
        engine.prepare(_request([DenseRewardItem(prompt="p", response="r"), DenseRewardItem(messages=CONVERSATION)]))
    assert caught.value.field == "items[1].messages" and "must open with user" in caught.value.message


def test_without_a_template_the_history_is_plain_text(llama_chat_rm_dir, causal_rm, encoder_rm):
    history = plain_conversation(
        [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "How is the weather in Paris?"},
         {"role": "assistant", "content": "", "tool_calls": [WEATHER_CALL]}, {"role": "tool", "content": "22 C, sunny"}]
    )
    assert history == (
        "system: You are brief.\nuser: How is the weather in Paris?\n"
        'assistant: get_weather({"city": "Paris"})\ntool: 22 C, sunny\n'
    )
    # A causal RM without a template (GPT-2), and the chat RM with --no-chat-template: the plain causal layout.
    switched_off = RewardModel.load(llama_chat_rm_dir, explain_dtype="float32", chat_template=False)
    for rm in (causal_rm, switched_off):
        inp = rm.encode_messages(CONVERSATION)
        ids, positions, spans = causal_layout(rm.tokenizer, history, RESPONSE, use_chat_template=False)
        assert list(inp.input_ids) == ids and list(inp.response_positions) == positions and inp.response_spans == spans
        assert "<|im_start|>" not in rm.tokenizer.decode(inp.input_ids)
    # An encoder RM: the pair template with the plain history as its first text.
    inp, pair = encoder_rm.encode_messages(CONVERSATION), encoder_rm.encode(history, RESPONSE)
    assert np.array_equal(inp.input_ids, pair.input_ids) and np.array_equal(inp.token_type_ids, pair.token_type_ids)
    assert inp.response_spans == pair.response_spans
    assert "".join(RESPONSE[a:b] for a, b in inp.response_spans).replace(" ", "") == RESPONSE.replace(" ", "")


@pytest.mark.parametrize("kind", ["encoder", "llama"])
def test_downstream_is_unchanged_conservation_and_attributions(kind, encoder_rm, llama_chat_rm):
    # [user: P, assistant: R] lays out as (P, R) does with the chat template, and as ("user: P\n", R) without one:
    # the answers must be identical, so explainers, shaping, alignment and spans are untouched by the new form.
    rm = encoder_rm if kind == "encoder" else llama_chat_rm
    prompt = "Tell me about your weekend."
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": RESPONSE}]
    pair = DenseRewardItem(prompt=prompt if kind == "llama" else f"user: {prompt}\n", response=RESPONSE)
    engine = Engine(rm, LIMITS)
    kw = dict(weights=ALL, return_components=True, return_attributions=True)
    a, b = (engine.run(_request([item], **kw), ALL).results[0] for item in (DenseRewardItem(messages=messages), pair))
    assert a.error is None and a.model_dump() == b.model_dump()
    assert abs(sum(a.token_rewards) - a.score) <= 1e-9 * max(1.0, abs(a.score))
    for att in a.attributions.values():
        assert math.fsum(att.values) + att.base == pytest.approx(a.score, abs=1e-9)


def test_policy_offsets_and_ids_refer_to_the_response_text(llama_chat_rm, bpe_policy_tokenizer_dir):
    from transformers import AutoTokenizer

    policy = AutoTokenizer.from_pretrained(bpe_policy_tokenizer_dir)
    ids = policy(RESPONSE, add_special_tokens=False)["input_ids"]
    engine = Engine(llama_chat_rm, LIMITS)
    request = _request([DenseRewardItem(messages=CONVERSATION, response_token_ids=ids)], policy_tokenizer=str(bpe_policy_tokenizer_dir))
    result = engine.run(request, ALL).results[0]
    assert result.error is None and len(result.token_rewards) == len(ids)
    assert [RESPONSE[a:b] for a, b in result.spans] == [policy.decode([i]) for i in ids]
    assert abs(sum(result.token_rewards) - result.score) <= 1e-9 * max(1.0, abs(result.score))


# --------------------------------------------------------------------------------------------------- truncation
def _turns(n):
    out = [{"role": "system", "content": "You are a helpful weather bot."}]
    for k in range(n):
        out += [{"role": "user", "content": f"Question {k}: is it sunny today?"}, {"role": "assistant", "content": f"Answer {k}: yes."}]
    return out + [{"role": "user", "content": "And tomorrow, will it rain?"}, {"role": "assistant", "content": RESPONSE}]


def _fits(rm, messages):
    return len(rm.encode_messages(messages).input_ids)


def test_truncation_drops_the_oldest_turns_and_keeps_the_system_message(llama_chat_rm):
    messages = _turns(4)
    kept = [messages[0]] + messages[5:]  # the two oldest exchanges dropped
    rm = dataclasses.replace(llama_chat_rm, max_length=_fits(llama_chat_rm, kept))
    inp = rm.encode_messages(messages)
    assert inp.prompt_truncated
    assert list(inp.input_ids) == list(llama_chat_rm.encode_messages(kept).input_ids)
    # One token more room changes nothing (the fewest messages are dropped); one less drops the next exchange.
    assert list(dataclasses.replace(rm, max_length=rm.max_length + 1).encode_messages(messages).input_ids) == list(inp.input_ids)
    tighter = dataclasses.replace(rm, max_length=rm.max_length - 1).encode_messages(messages)
    assert list(tighter.input_ids) == list(llama_chat_rm.encode_messages([messages[0]] + messages[7:]).input_ids)


def test_truncation_then_cuts_the_first_remaining_message_from_the_left(llama_chat_rm):
    messages = _turns(3)
    newest = [messages[0]] + messages[-2:]
    room = _fits(llama_chat_rm, newest) - 5
    rm = dataclasses.replace(llama_chat_rm, max_length=room)
    inp = rm.encode_messages(messages)
    text = rm.tokenizer.decode(inp.input_ids)
    assert inp.prompt_truncated and len(inp.input_ids) <= room
    assert "Question" not in text and "And tomorrow, will it rain?" in text
    system = text.split("<|im_start|>system\n", 1)[1].split("<|im_end|>", 1)[0]
    assert system and system != messages[0]["content"] and messages[0]["content"].endswith(system)
    assert rm.tokenizer.decode(inp.response_ids) == RESPONSE
    # Room for the response within the limits, but not for the template text around it: a 422 naming the messages.
    tiny = dataclasses.replace(llama_chat_rm, max_length=llama_chat_rm.count_response_tokens(RESPONSE) + 4)
    with pytest.raises(InvalidField) as caught:
        Engine(tiny, LIMITS).prepare(_request([DenseRewardItem(messages=messages)]))
    assert caught.value.field == "items[0].messages" and "exceeds" in caught.value.message


# ----------------------------------------------------------------------------------------------------- wire/cache
def test_the_cache_key_covers_the_history_and_the_task_payload_round_trips(llama_chat_rm):
    request = _request([DenseRewardItem(messages=CONVERSATION)])
    shared = request_shared_part(request, ALL, ["shap"], "rev")
    other = copy.deepcopy(CONVERSATION)
    other[3]["content"] = "5 C, rain"
    keys = {item_cache_key(shared, DenseRewardItem(messages=m)) for m in (CONVERSATION, other, CONVERSATION[-1:])}
    assert len(keys) == 3
    assert item_cache_key(shared, DenseRewardItem(messages=copy.deepcopy(CONVERSATION))) in keys
    # A prompt/response item keeps the key it had before messages existed.
    pair = DenseRewardItem(prompt="p", response=RESPONSE)
    body = {**shared, "prompt": "p", "response": RESPONSE, "offsets": None, "ids": None}
    import hashlib

    blob = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert item_cache_key(shared, pair) == hashlib.sha256(blob.encode("utf-8")).hexdigest()
    # The Celery path sends items as JSON (service/dispatch.py) and the worker validates them again
    # (workers/tasks.py): the derived response is not sent, so the item is not refused as giving both forms.
    payload = json.loads(json.dumps(request.items[0].model_dump(mode="json", exclude={"id"})))
    assert "response" not in payload
    again = DenseRewardsRequest.model_validate({**request.model_dump(mode="json", exclude={"items"}), "items": [payload]})
    assert again.items[0].response == RESPONSE and again.items[0].messages == request.items[0].messages


# ------------------------------------------------------------------------------------------------------- HTTP
@pytest.fixture(scope="module")
def chat_server(llama_chat_rm_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("messages-srv")
    proc, url = spawn_server(llama_chat_rm_dir, logs / "server.log", state_db=logs / "state.sqlite3", explain_dtype="float32")
    try:
        wait_ready(proc, url, logs / "server.log")
        yield url
    finally:
        stop(proc)


def test_http_messages_item(chat_server, llama_chat_rm):
    body = {"items": [{"id": "chat", "messages": CONVERSATION}, {"prompt": "p", "response": "Fine."}],
            "weights": {"sparse": 0.5, "loo": 0.5}, "return_attributions": True}
    answer = httpx.post(f"{chat_server}/v1/dense_rewards", json=body, timeout=120)
    assert answer.status_code == 200, answer.text
    result = answer.json()["results"][0]
    inp = llama_chat_rm.encode_messages(CONVERSATION)
    assert result["id"] == "chat" and result["rm_tokens"] == inp.n_tokens
    assert result["score"] == pytest.approx(_hf_score(llama_chat_rm, inp.input_ids), abs=1e-5)
    assert "".join(RESPONSE[a:b] for a, b in result["spans"]) == RESPONSE
    assert math.fsum(result["token_rewards"]) == pytest.approx(result["score"], abs=1e-9)
    loo = result["attributions"]["loo"]
    assert math.fsum(loo["values"]) + loo["base"] == pytest.approx(result["score"], abs=1e-9)


IMAGE = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}


@pytest.mark.parametrize(
    "item, field",
    [
        ({"messages": []}, "items[0].messages"),
        ({"messages": CONVERSATION[:2]}, "items[0].messages"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}, "items[0].messages"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [{"type": "text", "text": ""}]}]}, "items[0].messages"),
        ({"messages": [CONVERSATION[0], CONVERSATION[1], {"role": "user", "content": [{"type": "text", "text": "see"}, IMAGE]}, CONVERSATION[-1]]},
         "items[0].messages[2].content[1].type"),
        ({"messages": CONVERSATION, "response": RESPONSE}, "items[0].response"),
        ({"messages": CONVERSATION, "prompt": "p"}, "items[0].prompt"),
        ({}, "items[0].prompt"),
        ({"prompt": "p"}, "items[0].response"),
        ({"messages": [{"role": "user", "content": None}, CONVERSATION[-1]]}, "items[0].messages[0]"),
        ({"messages": [{"role": "developer", "content": "x"}, CONVERSATION[-1]]}, "items[0].messages[0].role"),
        ({"messages": [{"role": "user", "content": "hi", "tool_calls": [WEATHER_CALL]}, CONVERSATION[-1]]}, "items[0].messages[0]"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok", "tool_calls": [WEATHER_CALL]}]}, "items[0].messages"),
        ({"messages": [{"role": "user", "content": "hi", "refusal": "no"}, CONVERSATION[-1]]}, "items[0].messages[0].refusal"),
        ({"messages": CONVERSATION, "response_token_offsets": [[0, 99]]}, "items[0].response_token_offsets"),
    ],
    ids=["empty", "last-not-assistant", "blank-response", "empty-block", "image-block", "both-response", "both-prompt",
         "neither", "no-response", "null-user-content", "unknown-role", "user-tool-calls", "response-tool-calls",
         "unknown-field", "offsets-past-response"],
)
def test_http_bad_messages_are_422_naming_the_field(chat_server, item, field):
    answer = httpx.post(f"{chat_server}/v1/dense_rewards", json={"items": [item]}, timeout=60)
    assert answer.status_code == 422, answer.text
    error = answer.json()["error"]
    assert error["code"] == "invalid_request" and error["field"] == field, error


def test_sdk_messages_with_policy_ids(chat_server, bpe_policy_tokenizer_dir):
    from transformers import AutoTokenizer

    from tokencredit import Client

    policy = AutoTokenizer.from_pretrained(bpe_policy_tokenizer_dir)
    ids = policy(RESPONSE, add_special_tokens=False)["input_ids"] + [policy.eos_token_id]
    with Client(chat_server, weights={"sparse": 0.5, "loo": 0.5}) as tc:
        [plain, with_ids] = tc.dense_rewards(
            [{"messages": CONVERSATION}, {"messages": CONVERSATION, "response_token_ids": ids}], tokenizer=policy
        )
    assert plain.score == with_ids.score
    assert len(with_ids.token_rewards) == len(ids)
    assert [RESPONSE[a:b] for a, b in with_ids.spans] == [policy.decode([i]) for i in ids[:-1]] + [""]
    assert math.fsum(with_ids.token_rewards) == pytest.approx(with_ids.score, abs=1e-6)


def test_limits_name_the_response_message(llama_chat_rm, chat_server):
    from tokencredit import Client, PayloadTooLargeError

    small = LIMITS.model_copy(update={"max_response_chars": 10})
    with pytest.raises(InvalidField) as caught:  # PayloadTooLarge, a 413
        Engine(llama_chat_rm, small).prepare(_request([DenseRewardItem(messages=CONVERSATION)]))
    assert caught.value.status == 413 and caught.value.field == "items[0].messages[4].content"
    # The SDK's local check names it the same way, before any I/O.
    with Client(chat_server, limits=small) as tc, pytest.raises(PayloadTooLargeError) as local:
        tc.dense_rewards([{"messages": CONVERSATION}])
    assert local.value.field == "items[0].messages[4].content" and "checked locally" in str(local.value)
