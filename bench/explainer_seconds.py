"""Seconds per explained response for each explainer at its default budget (warm, one process).

Usage: python bench/explainer_seconds.py [--model DIR] [--tokens 64] [--responses 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

from workers.evaluator import CoalitionEvaluator, RowCounter, set_torch_threads
from workers.explainers import explain_lime, explain_loo, explain_shap
from workers.model import RewardModel

SENTENCES = [
    "The service was slow but the food was delicious and the staff were kind.",
    "I waited two hours for a flight that was cancelled again, awful experience.",
    "What a wonderful surprise to see my old friends at the concert last night!",
    "The battery dies after an hour and the screen scratches far too easily.",
    "Honestly the best coffee in town, and the pastries are fresh every morning.",
    "Nothing worked as promised and support never answered my three emails.",
]


def response_of(model: RewardModel, tokens: int, offset: int) -> str:
    """Real sentences, cut to exactly `tokens` RM tokens."""
    text = " ".join(SENTENCES[offset:] + SENTENCES[:offset]) * 3
    enc = model.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return text[: enc["offset_mapping"][tokens - 1][1]]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--responses", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.model is None:
        from workers.demo_model import ensure_demo_model

        args.model = str(ensure_demo_model())
    set_torch_threads(args.threads)
    model = RewardModel.load(args.model)
    evaluator = CoalitionEvaluator(model)
    methods = {
        "attention": lambda vf, inp: evaluator.attention(inp),
        "loo": lambda vf, inp: explain_loo(vf, inp.n_tokens),
        "shap": lambda vf, inp: explain_shap(vf, inp.n_tokens, seed=0),
        "lime": lambda vf, inp: explain_lime(vf, inp.n_tokens, seed=0),
    }
    warm = model.encode("Warm-up.", response_of(model, 8, 0))
    for fn in methods.values():
        fn(lambda m: evaluator(warm, m), warm)
    print(f"model {model.name} ({model.kind}, {model.device}, {model.dtype}), {args.tokens}-token responses, "
          f"{args.threads} torch thread(s)")
    print(f"{'method':<10} {'rows':>6} {'s/response':>11} {'ms/row':>8}")
    for name, fn in methods.items():
        times, rows = [], []
        for r in range(args.responses):
            inp = model.encode("Write a short review.", response_of(model, args.tokens, r))
            counter = RowCounter()
            start = time.perf_counter()
            fn(lambda m: evaluator(inp, m, counter), inp)
            times.append(time.perf_counter() - start)
            rows.append(max(counter.rows, 1))
        sec = float(np.mean(times))
        print(f"{name:<10} {np.mean(rows):>6.0f} {sec:>11.3f} {1000 * sec / np.mean(rows):>8.2f}")


if __name__ == "__main__":
    main()
