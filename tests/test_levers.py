"""Speed levers are exact or bounded: prompt KV reuse, bf16 rows, prefix scoring, device/dtype choice."""

import numpy as np
import pytest
import torch

from tokencredit.types import DenseRewardItem, DenseRewardsRequest, Limits, MethodsConfig, PrefixConfig, ShapingWeights
from workers import model as model_module
from workers.engine import Engine, InvalidField
from workers.evaluator import CoalitionEvaluator
from workers.model import RewardModel

PROMPT = "Tell me about your weekend. It was a long one, with a lot going on."
RESPONSE = "It was amazing, I had a great time 😀 with friends!"
LIMITS = Limits(max_items=4, max_response_tokens=200, max_total_tokens=800, max_response_chars=2000)


def _masks(n_tokens, rows=40, seed=0):
    return np.random.default_rng(seed).random((rows, n_tokens)) < 0.6


def test_prompt_kv_reuse_is_exact(causal_rm_dir):
    reuse = RewardModel.load(causal_rm_dir, explain_dtype="float32", kv_reuse=True)
    plain = RewardModel.load(causal_rm_dir, explain_dtype="float32", kv_reuse=False)
    inp = reuse.encode(PROMPT, RESPONSE)
    assert inp.response_positions[0] > 0  # there is a prompt to reuse
    masks = _masks(inp.n_tokens)
    a = CoalitionEvaluator(reuse, chunk_size=16)(inp, masks)
    b = CoalitionEvaluator(plain, chunk_size=16)(inp, masks)
    # The same arithmetic split differently (cached keys/values vs one pass): fp32 rounding only.
    assert np.abs(a - b).max() <= 1e-5


def test_bf16_rows_drift_is_bounded_and_the_score_stays_fp32(encoder_rm_dir):
    if not model_module.cpu_has_fast_bf16():
        pytest.skip("this CPU has no native bf16; auto keeps fp32 rows here (tested below)")
    fast = RewardModel.load(encoder_rm_dir, explain_dtype="bfloat16")
    exact = RewardModel.load(encoder_rm_dir, explain_dtype="float32")
    inp = fast.encode(PROMPT, RESPONSE)
    masks = _masks(inp.n_tokens, rows=64)
    a = CoalitionEvaluator(fast)(inp, masks)
    b = CoalitionEvaluator(exact)(inp, masks)
    spread = b.max() - b.min()
    # bf16 keeps 8 mantissa bits (~0.4 % per operation). Measured max drift over 64 rows: 6.0 % of the score
    # spread on this tiny encoder, 1.5 % on the tiny causal RM (the demo RM's figure is in bench/attribution.py);
    # 15 % catches a broken cast (wrong dtype on a layer, fp16 overflow), not rounding.
    assert np.abs(a - b).max() <= 0.15 * spread
    assert np.corrcoef(a, b)[0, 1] > 0.99
    # The sequence score R is never computed in bf16: conservation is against the exact score.
    assert CoalitionEvaluator(fast).score(inp) == CoalitionEvaluator(exact).score(inp)


def test_prefix_scores_telescope_to_the_sequence_score(causal_rm):
    inp = causal_rm.encode(PROMPT, RESPONSE)
    prefix = causal_rm.prefix_scores(inp)
    assert len(prefix) == inp.n_tokens + 1
    assert prefix[-1] == pytest.approx(CoalitionEvaluator(causal_rm).score(inp), abs=1e-5)
    # Entry t is the score of the sequence cut after response token t.
    for t in (1, inp.n_tokens // 2):
        ids = torch.tensor([list(inp.input_ids[: inp.response_positions[0] + t])])
        with torch.inference_mode():
            hidden = causal_rm.model.base_model(input_ids=ids).last_hidden_state
            expected = float(causal_rm.model.score(hidden[:, -1])[0, 0])
        assert prefix[t] == pytest.approx(expected, abs=1e-5)


def test_prefix_component_conserves_and_is_refused_for_encoders(causal_rm, encoder_rm):
    weights = ShapingWeights(sparse=0.3, prefix=0.7)
    request = DenseRewardsRequest(items=[DenseRewardItem(prompt=PROMPT, response=RESPONSE)], weights=weights)
    result = Engine(causal_rm, LIMITS).run(request, weights).results[0]
    assert result.error is None
    assert abs(sum(result.token_rewards) - result.score) <= 1e-9 * max(1.0, abs(result.score))
    with pytest.raises(InvalidField) as info:
        Engine(encoder_rm, LIMITS).prepare(request)
    assert info.value.field == "weights.prefix"
    methods_only = DenseRewardsRequest(items=request.items, methods=MethodsConfig(prefix=PrefixConfig()))
    with pytest.raises(InvalidField) as info:
        Engine(encoder_rm, LIMITS).prepare(methods_only)
    assert info.value.field == "methods.prefix"


def test_device_and_precision_choice(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert model_module.pick_device("auto") == "cuda"
    assert model_module.pick_dtype("auto", "cuda") == "bfloat16"
    assert model_module.pick_explain_dtype("auto", "cuda", "bfloat16") == "bfloat16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert model_module.pick_device("auto") == "cpu"
    assert model_module.pick_dtype("auto", "cpu") == "float32"
    monkeypatch.setattr(model_module, "cpu_has_fast_bf16", lambda: False)
    assert model_module.pick_explain_dtype("auto", "cpu", "float32") == "float32"
    monkeypatch.setattr(model_module, "cpu_has_fast_bf16", lambda: True)
    assert model_module.pick_explain_dtype("auto", "cpu", "float32") == "bfloat16"
    assert model_module.pick_explain_dtype("float32", "cpu", "float32") == "float32"
    with pytest.raises(model_module.ModelLoadError):
        model_module.pick_explain_dtype("int4", "cpu", "float32")


def test_chunk_size_follows_the_device(encoder_rm):
    assert CoalitionEvaluator(encoder_rm).chunk_size == 64
    gpu_like = type("M", (), {"device": "cuda:0"})()
    assert CoalitionEvaluator(gpu_like).chunk_size == 256


def test_compiled_rows_match_eager_rows_and_the_score_is_untouched(encoder_rm_dir):
    compiled = RewardModel.load(encoder_rm_dir, explain_dtype="float32", compile_rows="on")
    eager = RewardModel.load(encoder_rm_dir, explain_dtype="float32", compile_rows="off")
    assert compiled.compiled_rows is not None and eager.compiled_rows is None
    inner = compiled.compiled_rows
    inp = compiled.encode(PROMPT, RESPONSE)
    # The first row batch starts the compile in the background (and runs eager); wait for the graph.
    CoalitionEvaluator(compiled, chunk_size=16)(inp, _masks(inp.n_tokens, rows=16))
    assert inner.state in ("compiling", "ready") and inner.wait(timeout=600), inner.state
    calls = []
    compiled.compiled_rows = lambda **kw: calls.append(kw["input_ids"].shape) or inner(**kw)
    for rows, chunk in ((40, 16), (23, 64)):  # several batch sizes: one dynamic graph, no batch-of-one call
        masks = _masks(inp.n_tokens, rows=rows)
        a = CoalitionEvaluator(compiled, chunk_size=chunk)(inp, masks)
        b = CoalitionEvaluator(eager, chunk_size=chunk)(inp, masks)
        # Inductor fuses and reorders fp32 arithmetic: rounding-level differences only.
        assert np.abs(a - b).max() <= 1e-4 * max(1.0, np.abs(b).max())
    assert calls and all(shape[0] > 1 for shape in calls)
    # The sequence score R never runs through the compiled graph.
    assert CoalitionEvaluator(compiled).score(inp) == CoalitionEvaluator(eager).score(inp)
    assert len(calls) == sum(-(-rows // chunk) for rows, chunk in ((40, 16), (23, 64)))


def test_compiled_rows_fall_back_to_eager_when_compilation_fails(encoder_rm_dir, caplog):
    rm = RewardModel.load(encoder_rm_dir, explain_dtype="float32", compile_rows="off")
    inp = rm.encode(PROMPT, RESPONSE)
    masks = _masks(inp.n_tokens)
    expected = CoalitionEvaluator(rm)(inp, masks)

    def broken(**kw):
        raise RuntimeError("InductorError: no C++ compiler")  # what a machine without a toolchain raises

    rm.compiled_rows = broken
    with caplog.at_level("WARNING", logger="tokencredit.model"):
        np.testing.assert_allclose(CoalitionEvaluator(rm)(inp, masks), expected, atol=1e-6)
    assert rm.compiled_rows is None and "rows run eager" in caplog.text


def test_compiled_rows_run_eager_until_the_background_compile_is_done():
    """Ordering, not timing: a compile held on an event; calls made meanwhile run the eager model."""
    import threading

    from workers.row_backends import CompiledRows

    release, graph_calls = threading.Event(), []

    def graph(**kw):
        release.wait()
        graph_calls.append(kw["input_ids"])
        return "graph"

    rows = CompiledRows(lambda **kw: "eager", graph)
    assert rows(input_ids=torch.ones(2, 3)) == "eager" and rows.state == "compiling"
    assert rows(input_ids=torch.ones(2, 4)) == "eager"  # the graph is not ready: no wait on the request path
    release.set()
    assert rows.wait(timeout=60) and rows.state == "ready"
    assert rows(input_ids=torch.ones(2, 5)) == "graph"
    assert [t.shape for t in graph_calls] == [(2, 3), (2, 5)]  # compiled once, on the first call's inputs

    def broken(**kw):
        raise RuntimeError("InductorError: no C++ compiler")

    failed = CompiledRows(lambda **kw: "eager", broken)
    assert failed(input_ids=torch.ones(2, 3)) == "eager"
    assert not failed.wait(timeout=60) and failed.state == "failed"
    assert failed(input_ids=torch.ones(2, 3)) == "eager"


def test_compile_rows_auto_is_on_for_encoders_on_amx_cpus_only(encoder_rm_dir):
    from workers.row_backends import wants_compile

    # Measured: ×1.33 per row with AMX, ×1.06 without (not worth a 20-40 s compile), not measured on GPU.
    assert wants_compile("auto", "encoder", "cpu", amx=True)
    assert not wants_compile("auto", "encoder", "cpu", amx=False)
    assert not wants_compile("auto", "encoder", "cuda:0", amx=True)  # not measured on GPU
    assert not wants_compile("auto", "causal", "cpu")  # piecewise backbone + KV cache stay eager
    assert not wants_compile("on", "causal", "cpu")
    assert wants_compile("on", "encoder", "cuda")
    assert not wants_compile("off", "encoder", "cpu")
    with pytest.raises(model_module.ModelLoadError, match="compile_rows"):
        RewardModel.load(encoder_rm_dir, compile_rows="sometimes")


def _random_ids(vocab, rows=12, length=23, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(5, vocab, (rows, length), generator=generator)


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_score_position_rows_equal_the_full_model(arch):
    from transformers import BertConfig, BertForSequenceClassification, RobertaConfig, RobertaForSequenceClassification

    from workers.score_position_rows import score_position_rows

    shape = dict(vocab_size=120, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                 max_position_embeddings=64, num_labels=2, initializer_range=0.2)
    torch.manual_seed(0)
    if arch == "bert":
        model = BertForSequenceClassification(BertConfig(**shape)).eval()
    else:
        model = RobertaForSequenceClassification(RobertaConfig(**shape, pad_token_id=1)).eval()
    rows = score_position_rows(model)
    assert rows is not None
    ids = _random_ids(shape["vocab_size"])
    types = torch.zeros_like(ids)
    with torch.inference_mode():
        full = model(input_ids=ids, attention_mask=torch.ones_like(ids), token_type_ids=types).logits
        pruned = rows(input_ids=ids, attention_mask=torch.ones_like(ids), token_type_ids=types).logits
    # The same operations on position 0, only the other positions' last-layer work skipped: fp32 rounding only.
    assert full.std() > 0.05  # a real spread of scores, so agreement is not trivial
    torch.testing.assert_close(pruned, full, atol=1e-5, rtol=1e-5)


def test_unsupported_layouts_keep_the_full_model(causal_rm_dir):
    from transformers import BertConfig, BertForSequenceClassification, DistilBertConfig, DistilBertForSequenceClassification

    from workers.score_position_rows import score_position_rows

    shape = dict(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    assert score_position_rows(BertForSequenceClassification(BertConfig(**shape, chunk_size_feed_forward=4))) is None
    distil = DistilBertConfig(vocab_size=50, dim=16, n_layers=2, n_heads=2, hidden_dim=32)
    assert score_position_rows(DistilBertForSequenceClassification(distil)) is None
    causal = RewardModel.load(causal_rm_dir, explain_dtype="float32")
    assert not causal.score_position_rows  # causal RMs read the last position through their own KV-cache path


def test_pruned_rows_through_the_evaluator_match_full_rows(encoder_rm_dir):
    pruned = RewardModel.load(encoder_rm_dir, explain_dtype="float32")
    full = RewardModel.load(encoder_rm_dir, explain_dtype="float32", prune_last_layer=False)
    assert pruned.score_position_rows and not full.score_position_rows
    inp = pruned.encode(PROMPT, RESPONSE)
    masks = _masks(inp.n_tokens, rows=40)
    a = CoalitionEvaluator(pruned, chunk_size=16)(inp, masks)
    b = CoalitionEvaluator(full, chunk_size=16)(inp, masks)
    assert b.max() - b.min() > 0.05
    assert np.abs(a - b).max() <= 1e-5 * max(1.0, np.abs(b).max())
    # The sequence score R runs on the full model, whatever the rows do.
    assert CoalitionEvaluator(pruned).score(inp) == CoalitionEvaluator(full).score(inp)
