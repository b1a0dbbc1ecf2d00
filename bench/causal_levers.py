"""Causal-RM levers on a GPT-2 6L/384 reward model (random weights: speed and exactness only, no fidelity).

Prompt KV reuse (rows then run the response columns only) and prefix scoring (one pass for all prefixes).
There is no packaged causal RM, so the architecture is built from a config, as the tests do.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np


def _build(out: Path) -> Path:
    from tests.tiny_models import _bytelevel_bpe_tokenizer  # the same offline tokenizer recipe
    from transformers import GPT2Config, GPT2ForSequenceClassification, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=_bytelevel_bpe_tokenizer(vocab_size=2000),
                                  eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    config = GPT2Config(vocab_size=len(tok), n_embd=384, n_layer=6, n_head=6, n_positions=1024, num_labels=1,
                        pad_token_id=tok.pad_token_id, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    GPT2ForSequenceClassification(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def causal_section(quick: bool, kv: bool, bf16: bool) -> None:
    from tests.tiny_models import CORPUS
    from workers.evaluator import CoalitionEvaluator
    from workers.model import RewardModel

    prompt_words = 160 if quick else 320
    rows = 64 if quick else 128
    with tempfile.TemporaryDirectory() as tmp:
        path = _build(Path(tmp))
        dtype = "auto" if bf16 else "float32"
        fast = RewardModel.load(path, explain_dtype=dtype, kv_reuse=kv)
        plain = RewardModel.load(path, explain_dtype=dtype, kv_reuse=False)
        exact_fast = RewardModel.load(path, explain_dtype="float32", kv_reuse=True)
        exact_plain = RewardModel.load(path, explain_dtype="float32", kv_reuse=False)
        prompt = " ".join((" ".join(CORPUS)).split()[:prompt_words])
        response = " ".join((" ".join(CORPUS[::-1])).split()[:40])
        inp = fast.encode(prompt, response)
        masks = np.random.default_rng(0).random((rows, inp.n_tokens)) < 0.5
        timings = {}
        for name, m in (("kv", fast), ("plain", plain)):
            ev = CoalitionEvaluator(m)
            ev(inp, masks[:8])
            start = time.perf_counter()
            ev(inp, masks)
            timings[name] = time.perf_counter() - start
        drift = np.abs(CoalitionEvaluator(exact_fast)(inp, masks) - CoalitionEvaluator(exact_plain)(inp, masks)).max()
        start = time.perf_counter()
        prefix = exact_fast.prefix_scores(inp)
        one_pass = time.perf_counter() - start
        ev = CoalitionEvaluator(exact_plain)
        start = time.perf_counter()
        separate = [ev.score(exact_plain.encode(prompt, response[:b])) for _, b in inp.response_spans[:8]]
        eight = time.perf_counter() - start
        telescoping = abs(prefix[-1] - ev.score(inp))
    print(f"\ncausal RM (GPT-2 6L/384, random weights): prompt {int(inp.response_positions[0])} tokens, "
          f"response {inp.n_tokens} tokens, {rows} coalition rows")
    label = "on" if kv else "off (--no-kv)"
    print(f"  prompt KV reuse {label}: {timings['kv']:.2f} s vs {timings['plain']:.2f} s without "
          f"(x{timings['plain'] / timings['kv']:.1f}); fp32 max |delta score| {drift:.1e}")
    print(f"  prefix scoring: all {inp.n_tokens} prefixes in one pass {1000 * one_pass:.0f} ms vs "
          f"{1000 * eight / 8 * inp.n_tokens:.0f} ms as separate passes (x{eight / 8 * inp.n_tokens / one_pass:.0f}); "
          f"|last prefix - score| {telescoping:.1e}")
    print(f"  attention (ABC): 2 forward passes per response (score + attention row)")
