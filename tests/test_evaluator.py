"""The coalition evaluator: id replacement on response tokens only, dedup, chunking, the score read correctly."""

import numpy as np
import pytest
import torch

from workers.evaluator import CoalitionEvaluator, RowCounter
from workers.model import RewardModel

PROMPT = "Tell me about your weekend."
RESPONSE = "It was amazing, I had a great time 😀 with friends!"


def _hf_score(rm, prompt, response):
    """The score as the model's own pipeline computes it: tokenizer call + full forward, no TokenCredit code."""
    tok = rm.tokenizer
    with torch.inference_mode():
        if rm.kind == "encoder":
            logits = rm.model(**tok(prompt, response, return_tensors="pt")).logits[0]
            return float(logits[1] - logits[0])
        ids = tok(prompt, add_special_tokens=False)["input_ids"] + tok(response, add_special_tokens=False)["input_ids"]
        return float(rm.model(input_ids=torch.tensor([ids])).logits[0, 0])


@pytest.fixture(params=["encoder", "causal"])
def rm(request, encoder_rm, causal_rm):
    return encoder_rm if request.param == "encoder" else causal_rm


def test_unmasked_score_matches_the_models_own_forward(rm):
    inp = rm.encode(PROMPT, RESPONSE)
    assert CoalitionEvaluator(rm).score(inp) == pytest.approx(_hf_score(rm, PROMPT, RESPONSE), abs=1e-5)


def test_only_response_tokens_are_replaced_and_lengths_never_change(rm, causal_rm_dir, monkeypatch):
    if rm.kind == "causal":  # id replacement is one of a causal RM's value functions (tests/test_causal_masking.py)
        rm = RewardModel.load(causal_rm_dir, explain_dtype="float32", causal_masking="replace")
    inp = rm.encode(PROMPT, RESPONSE)
    seen = []
    original = rm.scores

    def spy(ids, types, low_precision=False, cache=None, **reading):
        full = ids
        if cache is not None:  # causal KV reuse: only the response columns run, the prompt comes from the cache
            prefix = inp.input_ids[: inp.response_positions[0]]
            full = np.concatenate([np.broadcast_to(prefix, (len(ids), len(prefix))), ids], axis=1)
        seen.append(full.copy())
        return original(ids, types, low_precision, cache, **reading)

    monkeypatch.setattr(rm, "scores", spy)
    masks = np.random.default_rng(0).random((10, inp.n_tokens)) < 0.5
    CoalitionEvaluator(rm, chunk_size=4)(inp, masks)
    rows = np.concatenate(seen)
    outside = np.setdiff1d(np.arange(len(inp.input_ids)), inp.response_positions)
    assert rows.shape[1] == len(inp.input_ids)
    assert np.all(rows[:, outside] == inp.input_ids[outside])  # prompt and specials untouched
    response = rows[:, inp.response_positions]
    kept = np.isin(response, inp.response_ids) & (response != rm.mask_token_id)
    assert np.all((response == rm.mask_token_id) | kept)
    assert [len(chunk) for chunk in seen] == [3, 4, 3]  # balanced chunks of at most 4


def test_duplicate_masks_are_evaluated_once(rm):
    inp = rm.encode(PROMPT, RESPONSE)
    masks = np.ones((6, inp.n_tokens), bool)
    masks[1::2, 0] = False  # two distinct rows, three copies each
    counter = RowCounter()
    scores = CoalitionEvaluator(rm)(inp, masks, counter)
    assert counter.rows == 2 and counter.requested == 6
    assert scores[0] == scores[2] == scores[4] and scores[1] == scores[3] == scores[5]


def test_chunking_does_not_change_scores(rm):
    inp = rm.encode(PROMPT, RESPONSE)
    masks = np.random.default_rng(1).random((50, inp.n_tokens)) < 0.7
    a = CoalitionEvaluator(rm, chunk_size=7)(inp, masks)
    b = CoalitionEvaluator(rm, chunk_size=64)(inp, masks)
    assert np.allclose(a, b, atol=1e-5)  # fp32 reductions depend on the batch shape at ~1e-7


@pytest.mark.parametrize("masking", ["replace", "attention", "delete", "ellipsis"])
def test_causal_score_is_never_read_at_a_masked_last_token(causal_rm_dir, masking):
    # Without a chat template (and eos = pad, as here) the score is read at the last token. A row that masks the
    # last response token is then read at the last kept one: the RM's own forward on the text without it. (Before,
    # it was read at the masked position itself, where the tiny GPT-2 had the pad id.)
    rm = RewardModel.load(causal_rm_dir, explain_dtype="float32", causal_masking=masking)
    assert rm.mask_token_id == rm.tokenizer.pad_token_id == rm.tokenizer.eos_token_id
    inp = rm.encode(PROMPT, RESPONSE)
    assert inp.response_end == len(inp.input_ids)  # nothing after the response: eos = pad is not appended
    mask = np.ones((1, inp.n_tokens), bool)
    mask[0, -1] = False
    ids = inp.input_ids[:-1]
    if masking == "ellipsis":  # the text ends in the "..." that stands for the token, as in shap's Text masker
        ids = np.concatenate([ids, rm.tokenizer(" ...", add_special_tokens=False)["input_ids"]])
    with torch.inference_mode():
        expected = float(rm.model(input_ids=torch.from_numpy(ids[None])).logits[0, 0])
    assert CoalitionEvaluator(rm)(inp, mask)[0] == pytest.approx(expected, abs=1e-5)


def test_bad_mask_shape_is_refused(encoder_rm):
    inp = encoder_rm.encode(PROMPT, RESPONSE)
    with pytest.raises(ValueError, match="masks must be"):
        CoalitionEvaluator(encoder_rm)(inp, np.ones((2, inp.n_tokens + 1), bool))


def test_long_prompts_are_cut_from_the_left(encoder_rm):
    long_prompt = " ".join(["the weather is a constant reminder"] * 100)
    inp = encoder_rm.encode(long_prompt, RESPONSE)
    assert inp.prompt_truncated
    assert len(inp.input_ids) <= encoder_rm.max_length
    assert encoder_rm.tokenizer.decode(inp.response_ids) == encoder_rm.tokenizer.decode(encoder_rm.encode("", RESPONSE).response_ids)


def test_rows_use_sdpa_and_the_attention_row_still_reads_eager_weights(rm, encoder_rm_dir, causal_rm_dir):
    from transformers import AutoModelForSequenceClassification

    assert rm.model.config._attn_implementation == "sdpa"
    inp = rm.encode(PROMPT, RESPONSE)
    row = CoalitionEvaluator(rm).attention(inp)
    # The same weights loaded with eager attention, read directly: what ABC credit is defined on.
    eager = AutoModelForSequenceClassification.from_pretrained(
        encoder_rm_dir if rm.kind == "encoder" else causal_rm_dir, attn_implementation="eager"
    ).eval()
    ids = torch.from_numpy(inp.input_ids[None])
    with torch.inference_mode():
        attentions = eager(input_ids=ids, output_attentions=True).attentions[-1][0].mean(dim=0)
    expected = attentions[inp.score_position].numpy()[inp.response_positions]
    np.testing.assert_allclose(row, expected, atol=1e-6)
    assert rm.model.config._attn_implementation == "sdpa"  # switched back for the rows
    assert CoalitionEvaluator(rm).score(inp) == pytest.approx(_hf_score(rm, PROMPT, RESPONSE), abs=1e-5)
