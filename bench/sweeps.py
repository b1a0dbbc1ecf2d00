"""Benchmark sections beyond the main table: rows needed for ρ ≥ 0.95, bf16 drift, process-per-core throughput."""

from __future__ import annotations

import time
from concurrent.futures import ProcessPoolExecutor
import multiprocessing

import numpy as np
from scipy.stats import spearmanr

from workers.evaluator import CoalitionEvaluator
from workers.explainers import explain_shap, stratified_rows


def rows_for_fidelity(evaluator, inputs, references, seeds, max_passes=4) -> None:
    """Mean Spearman by number of antithetic passes, shap's Permutation (independent orderings, 2T+1 rows a pass)
    against ours (stratified positions, shared empty/full rows: 2 + 2P(T−1) rows), over responses × seeds."""
    n_tokens = inputs[0].n_tokens
    variants = {
        "shap Permutation (antithetic, independent orderings)": ("permutation", lambda p: p * (2 * n_tokens + 1)),
        "stratified positions, shared empty/full rows (ours)": ("stratified", lambda p: stratified_rows(n_tokens, p)),
    }
    print(f"\nrows needed for spearman >= 0.95 (mean over {len(inputs)} response(s) x {len(seeds)} seed(s), "
          f"+- standard error)")
    print("| estimator | " + " | ".join(f"{p} pass(es)" for p in range(1, max_passes + 1)) + " | rows for 0.95 |")
    print("|---" * (max_passes + 2) + "|")
    for label, (estimator, rows_of) in variants.items():
        cells, enough = [], None
        for passes in range(1, max_passes + 1):
            rhos = [spearmanr(explain_shap(lambda m, inp=inp: evaluator(inp, m), n_tokens, estimator=estimator,
                                           max_rows=rows_of(passes), seed=s).values, reference)[0]
                    for inp, reference in zip(inputs, references) for s in seeds]
            mean, se = float(np.mean(rhos)), float(np.std(rhos) / np.sqrt(len(rhos)))
            cells.append(f"{mean:.3f} +- {se:.3f} ({rows_of(passes)} rows)")
            enough = enough or (rows_of(passes) if mean >= 0.95 else None)
        print(f"| {label} | " + " | ".join(cells) + f" | {enough or '> ' + str(rows_of(max_passes))} |")


def row_costs(model_fp32, model_fast, rm_input, rows: int = 256, repeats: int = 3, model_full_last_layer=None) -> None:
    """Milliseconds per coalition row: fp32, bf16 eager, bf16 compiled (when on), and bf16 eager with the full
    last layer (when `model_full_last_layer` is given), the same masks, interleaved."""
    masks = np.random.default_rng(0).random((rows, rm_input.n_tokens)) < 0.5
    compiled = model_fast.compiled_rows
    variants = {"fp32 eager": (model_fp32, None), f"{model_fast.explain_dtype} eager": (model_fast, None)}
    if compiled is not None:
        variants[f"{model_fast.explain_dtype} compiled"] = (model_fast, compiled)
    if model_full_last_layer is not None:
        variants[f"{model_full_last_layer.explain_dtype} eager, full last layer"] = (model_full_last_layer, None)
    times = {name: [] for name in variants}
    try:
        for _ in range(repeats):
            for name, (model, graph) in variants.items():
                model.compiled_rows = graph
                evaluator = CoalitionEvaluator(model)
                start = time.perf_counter()
                evaluator(rm_input, masks)
                times[name].append((time.perf_counter() - start) / rows * 1000)
    finally:
        model_fast.compiled_rows = compiled
    print("\nrow cost (ms per row, median of " + str(repeats) + ", " + str(rows) + " rows of "
          + str(len(rm_input.input_ids)) + " tokens): "
          + "; ".join(f"{name} {np.median(t):.2f}" for name, t in times.items()))


def bf16_drift(model_fp32, model_fast, rm_input, budget, seed, coalitions: int = 256) -> None:
    """Score drift of bf16 rows against fp32 rows on the same coalitions, and what it does to SHAP values."""
    if model_fast.explain_dtype == "float32":
        print("\nbf16 drift: rows already fp32 (--no-bf16 or no native bf16)")
        return
    exact, fast = CoalitionEvaluator(model_fp32), CoalitionEvaluator(model_fast)
    masks = np.random.default_rng(seed).random((coalitions, rm_input.n_tokens)) < 0.5
    a, b = exact(rm_input, masks), fast(rm_input, masks)
    phi_exact = explain_shap(lambda m: exact(rm_input, m), rm_input.n_tokens, max_rows=budget, seed=seed).values
    phi_fast = explain_shap(lambda m: fast(rm_input, m), rm_input.n_tokens, max_rows=budget, seed=seed).values
    print(f"\nbf16 drift on {coalitions} random coalitions: max |delta score| {np.abs(a - b).max():.4f} "
          f"({np.abs(a - b).max() / a.std():.3f} of the score std {a.std():.3f}); "
          f"shap values fp32 vs bf16 at the same seed: spearman {spearmanr(phi_exact, phi_fast)[0]:.3f}, "
          f"max |delta| {np.abs(phi_exact - phi_fast).max():.4f} of max |phi| {np.abs(phi_exact).max():.4f}")


_WORKER = {}


def _init(model_dir: str, compile_rows: str, prune_last_layer: bool, warm_job) -> None:
    from workers.evaluator import set_torch_threads
    from workers.model import RewardModel

    set_torch_threads(1)
    _WORKER["model"] = RewardModel.load(model_dir, compile_rows=compile_rows, prune_last_layer=prune_last_layer)
    _WORKER["evaluator"] = CoalitionEvaluator(_WORKER["model"])
    _explain(warm_job)  # every worker compiles and warms up before the clock starts


def _explain(job) -> float:
    prompt, response, budget, seed = job
    inp = _WORKER["model"].encode(prompt, response)
    ev = _WORKER["evaluator"]
    start = time.perf_counter()
    explain_shap(lambda m: ev(inp, m), inp.n_tokens, max_rows=budget, seed=seed)
    return time.perf_counter() - start


def process_per_core(model_dir: str, jobs, processes: int = 2, compile_rows: str = "auto",
                     prune_last_layer: bool = True) -> float:
    """Seconds per response when `processes` single-thread workers explain `jobs` concurrently (warm)."""
    ctx = multiprocessing.get_context("spawn")  # torch is not fork-safe once threads exist
    with ProcessPoolExecutor(processes, mp_context=ctx, initializer=_init,
                             initargs=(model_dir, compile_rows, prune_last_layer, jobs[0])) as pool:
        list(pool.map(_explain, jobs[:processes]))  # the pool starts its workers lazily: make sure all are up
        start = time.perf_counter()
        list(pool.map(_explain, jobs))
        return (time.perf_counter() - start) / len(jobs)
