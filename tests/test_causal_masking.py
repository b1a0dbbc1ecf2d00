"""Causal RMs' value functions ("attention", "delete", "ellipsis", "replace") against the HF model run directly,
and the chat-template layout: the score R is the model's own, a masked row is what its mode says it is, and the
score is never read at an absent token."""

import dataclasses
import functools

import numpy as np
import pytest
import torch

from workers.evaluator import CoalitionEvaluator
from workers.model import CAUSAL_MASKING_MODES, ModelLoadError, RewardModel, causal_layout

PROMPT = "Tell me about your weekend."
RESPONSE = "It was amazing, I had a great time with friends!"

# (fixture, chat template): a Llama RM read at its ChatML end-of-turn text, the same RM laid out as plain text, and
# a GPT-2 RM (plain text, eos = pad, so it is read at the last kept token).
LAYOUTS = [("llama_chat_rm_dir", True), ("llama_chat_rm_dir", False), ("causal_rm_dir", True)]
LAYOUT_IDS = ["llama-chat-template", "llama-plain-text", "gpt2-plain-text"]


@functools.lru_cache(maxsize=None)
def _load(path, masking, kv_reuse=True, chat_template=True, explain_dtype="float32"):
    return RewardModel.load(path, explain_dtype=explain_dtype, causal_masking=masking, kv_reuse=kv_reuse,
                            chat_template=chat_template)


@pytest.fixture(params=LAYOUTS, ids=LAYOUT_IDS)
def layout(request):
    fixture, template = request.param
    return str(request.getfixturevalue(fixture)), template


def _hf_score(rm, ids, positions=None) -> float:
    """The RM's own forward and head (HF reads the last non-pad token); `positions` are explicit position ids."""
    if len(ids) == 0:
        return 0.0  # an empty text (no prompt, no template, nothing kept): 0.0 by convention, as prefix entry 0
    kwargs = {"input_ids": torch.tensor([list(ids)])}
    if positions is not None:
        # With an explicit mask HF takes the positions as given (without one it would read gaps as packed sequences).
        kwargs["position_ids"] = torch.tensor([list(positions)])
        kwargs["attention_mask"] = torch.ones_like(kwargs["input_ids"])
    with torch.inference_mode():
        return float(rm.model(**kwargs).logits[0, 0])


def _reference(rm, inp, keep, masking) -> float:
    """Each mode's row computed independently of the evaluator, straight from its definition."""
    ids, start, end = [int(i) for i in inp.input_ids], inp.response_start, inp.response_end
    head, response, tail = ids[:start], ids[start:end], ids[end:]
    kept = [t for t, k in zip(response, keep) if k]
    if masking == "delete":
        return _hf_score(rm, head + kept + tail)
    if masking == "attention":
        # The kept ids alone at their own positions: what no one attends to might as well not be there.
        at = list(range(start)) + [start + i for i in np.flatnonzero(keep)] + list(range(end, len(ids)))
        return _hf_score(rm, [ids[i] for i in at], at)
    if masking == "ellipsis":
        middle = []
        for i, k in enumerate(keep):
            if k:
                middle.append(response[i])
            elif i == 0 or keep[i - 1]:  # one "..." per run of absent tokens, " ..." inside the text
                middle += rm.tokenizer("..." if i == 0 else " ...", add_special_tokens=False)["input_ids"]
        return _hf_score(rm, head + middle + tail)
    assert masking == "replace"
    replaced = [t if k else rm.mask_token_id for t, k in zip(response, keep)]
    if tail:
        return _hf_score(rm, head + replaced + tail)
    # Nothing after the response: the score is the text's up to its last kept token, never at a mask id.
    last = int(np.flatnonzero(keep)[-1]) + 1 if np.any(keep) else 0
    return _hf_score(rm, head + replaced[:last])


def _masks(n, rows=14, seed=0):
    masks = np.random.default_rng(seed).random((rows, n)) < 0.5
    masks[0] = True  # the full coalition
    masks[1] = False  # the empty one
    masks[2] = True
    masks[2, -1] = False  # only the last token absent
    masks[3] = False
    masks[3, 0] = True  # only the first kept
    masks[4] = True
    masks[4, 0] = False  # a run of absent tokens opening the response
    masks[4, 1] = False
    return masks


@pytest.mark.parametrize("kv_reuse", [True, False], ids=["kv", "no-kv"])
def test_the_full_coalition_is_the_models_own_score_in_every_mode(layout, kv_reuse):
    path, template = layout
    scores = {}
    for masking in CAUSAL_MASKING_MODES:
        rm = _load(path, masking, kv_reuse, template)
        inp = rm.encode(PROMPT, RESPONSE)
        scores[masking] = CoalitionEvaluator(rm).score(inp)
        assert scores[masking] == pytest.approx(_hf_score(rm, inp.input_ids), abs=1e-5)
    # The full row is the unmasked input whatever the mode: R is the same number, bit for bit.
    assert len(set(scores.values())) == 1


@pytest.mark.parametrize("kv_reuse", [True, False], ids=["kv", "no-kv"])
@pytest.mark.parametrize("masking", CAUSAL_MASKING_MODES)
def test_masked_rows_equal_the_modes_reference_computed_with_the_hf_model(layout, masking, kv_reuse):
    path, template = layout
    rm = _load(path, masking, kv_reuse, template)
    inp = rm.encode(PROMPT, RESPONSE)
    masks = _masks(inp.n_tokens)
    got = CoalitionEvaluator(rm, chunk_size=5)(inp, masks)
    expected = np.array([_reference(rm, inp, keep, masking) for keep in masks])
    assert np.ptp(expected) > 0.05  # the rows really differ, so agreement is not trivial
    # Batched rows vs lone forwards (and cached prompt vs one pass): fp32 rounding only.
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-5)


def test_the_empty_text_is_worth_zero(causal_rm_dir):
    # GPT-2 adds no BOS: with an empty prompt and every response token absent there is no token left to read.
    for masking in CAUSAL_MASKING_MODES:
        rm = _load(causal_rm_dir, masking)
        inp = rm.encode("", RESPONSE)
        assert inp.response_start == 0
        masks = _masks(inp.n_tokens)
        got = CoalitionEvaluator(rm)(inp, masks)
        if masking != "ellipsis":  # under "ellipsis" the empty coalition is the text "..."
            assert got[1] == 0.0
        np.testing.assert_allclose(got, [_reference(rm, inp, keep, masking) for keep in masks], atol=2e-5)


@pytest.mark.parametrize("masking", ["attention", "delete", "replace"])
def test_plain_text_rows_are_read_at_the_last_kept_token(causal_rm_dir, masking):
    # Keeping the first t tokens is the text cut after token t: exactly the prefix score, never a read at an
    # absent token (under "replace" the absent ids after the last kept one cannot reach it in a causal model).
    rm = _load(causal_rm_dir, masking)
    inp = rm.encode(PROMPT, RESPONSE)
    n = inp.n_tokens
    prefixes = np.tril(np.ones((n + 1, n), dtype=bool), k=-1)  # row t keeps tokens 0..t-1
    np.testing.assert_allclose(CoalitionEvaluator(rm)(inp, prefixes), rm.prefix_scores(inp), rtol=0, atol=2e-5)


def test_chat_template_rows_are_read_at_the_end_of_turn_text(llama_chat_rm_dir):
    rm = _load(llama_chat_rm_dir, "replace")
    inp = rm.encode(PROMPT, RESPONSE)
    keep = _masks(inp.n_tokens)
    assert np.all(rm.read_positions(inp, keep) == len(inp.input_ids) - 1)
    assert rm.tokenizer.decode(inp.input_ids[inp.response_end :]) == "<|im_end|>\n"


def test_absent_tokens_are_invisible_under_attention_masking(llama_chat_rm_dir):
    # Whatever ids sit at absent positions, no kept position sees them: a row cannot depend on them.
    rm = _load(llama_chat_rm_dir, "attention")
    inp = rm.encode(PROMPT, RESPONSE)
    evaluator = CoalitionEvaluator(rm)
    rng = np.random.default_rng(3)
    for keep in _masks(inp.n_tokens)[1:]:
        scrambled = inp.input_ids.copy()
        absent = inp.response_positions[~keep]
        scrambled[absent] = rng.integers(5, 250, len(absent))
        other = dataclasses.replace(inp, input_ids=scrambled)
        assert evaluator(other, keep[None])[0] == pytest.approx(evaluator(inp, keep[None])[0], abs=1e-6)


@pytest.mark.parametrize("masking", ["delete", "ellipsis"])
@pytest.mark.parametrize("kv_reuse", [True, False], ids=["kv", "no-kv"])
def test_rows_of_different_lengths_in_one_batch_equal_their_lone_evaluations(layout, masking, kv_reuse):
    path, template = layout
    rm = _load(path, masking, kv_reuse, template)
    inp = rm.encode(PROMPT, RESPONSE)
    masks = _masks(inp.n_tokens, rows=40, seed=1)
    evaluator = CoalitionEvaluator(rm, chunk_size=16)
    batched = evaluator(inp, masks)
    lone = np.array([evaluator(inp, keep[None])[0] for keep in masks])
    assert len({int(k.sum()) for k in masks}) > 5  # many lengths in each chunk
    np.testing.assert_allclose(batched, lone, rtol=0, atol=2e-5)


def test_chat_template_layout_points_at_the_response_and_ends_with_the_template(llama_chat_rm_dir):
    rm = _load(llama_chat_rm_dir, "attention")
    tok = rm.tokenizer
    inp = rm.encode(PROMPT, RESPONSE)
    messages = [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": RESPONSE}]
    assert tok.decode(inp.input_ids) == tok.apply_chat_template(messages, tokenize=False)
    assert tok.decode(inp.response_ids) == RESPONSE
    assert np.array_equal(inp.response_positions, np.arange(inp.response_start, inp.response_end))
    assert "".join(RESPONSE[a:b] for a, b in inp.response_spans) == RESPONSE
    assert tok.decode(inp.input_ids[: inp.response_start]).endswith("<|im_start|>assistant\n")
    assert inp.score_position == len(inp.input_ids) - 1 > inp.response_end - 1
    # Prefix scores: entry 0 after the template's head, entry t at response token t; entry T is not R, which is read
    # after the end-of-turn text.
    prefix = rm.prefix_scores(inp)
    ids = list(inp.input_ids)
    assert len(prefix) == inp.n_tokens + 1
    assert prefix[0] == pytest.approx(_hf_score(rm, ids[: inp.response_start]), abs=1e-5)
    assert prefix[-1] == pytest.approx(_hf_score(rm, ids[: inp.response_end]), abs=1e-5)
    assert abs(CoalitionEvaluator(rm).score(inp) - prefix[-1]) > 1e-3
    # --no-chat-template: the plain-text layout, no template text at all.
    plain = _load(llama_chat_rm_dir, "attention", chat_template=False).encode(PROMPT, RESPONSE)
    assert tok.decode(plain.input_ids) == PROMPT + RESPONSE


def test_plain_text_layout_appends_eos_only_when_it_is_not_the_pad_token(llama_chat_rm_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llama_chat_rm_dir)
    assert tok.eos_token_id == tok.pad_token_id  # SmolLM2's layout: HF's head skips a trailing eos = pad
    ids, positions, _ = causal_layout(tok, PROMPT, RESPONSE, use_chat_template=False)
    assert positions[-1] == len(ids) - 1
    tok.pad_token = "<|endoftext|>"  # an RM trained on text + EOS with its own pad token reads at the EOS
    ids, positions, _ = causal_layout(tok, PROMPT, RESPONSE, use_chat_template=False)
    assert ids[-1] == tok.eos_token_id and positions[-1] == len(ids) - 2


@pytest.mark.parametrize("masking", CAUSAL_MASKING_MODES)
def test_bf16_rows_stay_close_and_the_score_stays_full_precision(llama_chat_rm_dir, masking):
    # bf16 rows exercise the casts the row paths make (the 4D attention mask is built in the row model's dtype).
    fast = _load(llama_chat_rm_dir, masking, explain_dtype="bfloat16")
    exact = _load(llama_chat_rm_dir, masking)
    inp = fast.encode(PROMPT, RESPONSE)
    masks = _masks(inp.n_tokens, rows=24)
    a, b = CoalitionEvaluator(fast)(inp, masks), CoalitionEvaluator(exact)(inp, masks)
    assert np.all(np.isfinite(a))
    # bf16 keeps 8 mantissa bits; 15 % of the spread catches a wrong cast or mask, not rounding.
    assert np.abs(a - b).max() <= 0.15 * np.ptp(b)
    assert CoalitionEvaluator(fast).score(inp) == CoalitionEvaluator(exact).score(inp)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("masking", CAUSAL_MASKING_MODES)
def test_rows_on_gpu_match_rows_on_cpu(llama_chat_rm_dir, masking):
    gpu = RewardModel.load(llama_chat_rm_dir, device="cuda", dtype="float32", explain_dtype="float32",
                           causal_masking=masking)
    cpu = _load(llama_chat_rm_dir, masking)
    inp = cpu.encode(PROMPT, RESPONSE)
    masks = _masks(inp.n_tokens, rows=24)
    np.testing.assert_allclose(CoalitionEvaluator(gpu)(inp, masks), CoalitionEvaluator(cpu)(inp, masks), atol=1e-4)


def test_unknown_modes_are_refused_and_encoders_keep_mask_replacement(llama_chat_rm_dir, encoder_rm_dir):
    with pytest.raises(ModelLoadError, match="causal_masking"):
        RewardModel.load(llama_chat_rm_dir, causal_masking="blank")
    encoder = RewardModel.load(encoder_rm_dir, explain_dtype="float32", causal_masking="delete")
    default = RewardModel.load(encoder_rm_dir, explain_dtype="float32")
    assert encoder.masking == default.masking == "replace"
    inp = encoder.encode(PROMPT, RESPONSE)
    masks = _masks(inp.n_tokens)
    np.testing.assert_array_equal(CoalitionEvaluator(encoder)(inp, masks), CoalitionEvaluator(default)(inp, masks))


def test_settings_cli_and_cache_key_carry_the_mode(monkeypatch, tmp_path):
    from pydantic import ValidationError

    from service.cli import build_parser
    from service.config import Settings
    from service.dispatch import CeleryExecutor
    from service.worker_main import _child_command

    monkeypatch.setenv("TOKENCREDIT_CAUSAL_MASKING", "delete")
    monkeypatch.setenv("TOKENCREDIT_CHAT_TEMPLATE", "false")
    kwargs = Settings().model_kwargs()
    assert kwargs["causal_masking"] == "delete" and kwargs["chat_template"] is False
    monkeypatch.setenv("TOKENCREDIT_CAUSAL_MASKING", "blank")
    with pytest.raises(ValidationError):
        Settings()
    monkeypatch.delenv("TOKENCREDIT_CAUSAL_MASKING")
    monkeypatch.delenv("TOKENCREDIT_CHAT_TEMPLATE")

    broker = "redis://127.0.0.1:1/0"
    args = build_parser().parse_args(["worker", "--model", str(tmp_path), "--broker", broker,
                                      "--causal-masking", "ellipsis", "--no-chat-template"])
    settings = Settings(model=str(tmp_path), broker_url=broker, causal_masking=args.causal_masking,
                        chat_template=args.chat_template)
    assert settings.causal_masking == "ellipsis" and settings.chat_template is False
    child = build_parser().parse_args(_child_command(settings, args, 0)[3:])  # children get the same flags
    assert (child.causal_masking, child.chat_template) == ("ellipsis", "off")
    # Cached answers of one value function are never served for another.
    numerics = {
        CeleryExecutor(Settings(model=str(tmp_path), broker_url=broker, causal_masking=m, chat_template=t))._numerics
        for m in CAUSAL_MASKING_MODES
        for t in (True, False)
    }
    assert len(numerics) == 2 * len(CAUSAL_MASKING_MODES)
