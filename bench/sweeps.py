"""Benchmark sections beyond the main table: rows needed for ρ ≥ 0.95, bf16 drift, process-per-core throughput."""

from __future__ import annotations

import time
from concurrent.futures import ProcessPoolExecutor
import multiprocessing

import numpy as np
from scipy.stats import spearmanr

from workers.evaluator import CoalitionEvaluator
from workers.explainers import explain_shap


def rows_for_fidelity(value_fn, n_tokens, reference, seeds, max_passes=4) -> None:
    """Mean Spearman by number of antithetic passes (2T+1 rows each), with and without each lever."""
    variants = {
        "shap Permutation (antithetic)": "permutation",
        "+ stratified positions (ours)": "stratified",
    }
    print(f"\nrows needed for spearman >= 0.95 (mean over {len(seeds)} seeds; rows = passes x (2T+1))")
    print("| estimator | " + " | ".join(f"{p} pass ({p * (2 * n_tokens + 1)} rows)" for p in range(1, max_passes + 1)) + " | rows for 0.95 |")
    print("|---" * (max_passes + 2) + "|")
    for label, estimator in variants.items():
        means = []
        for passes in range(1, max_passes + 1):
            rhos = [spearmanr(explain_shap(value_fn, n_tokens, estimator=estimator, max_rows=passes * (2 * n_tokens + 1),
                                           seed=s).values, reference)[0] for s in seeds]
            means.append(float(np.mean(rhos)))
        enough = next((p * (2 * n_tokens + 1) for p, m in zip(range(1, max_passes + 1), means) if m >= 0.95), None)
        print(f"| {label} | " + " | ".join(f"{m:.3f}" for m in means) + f" | {enough or '> ' + str(max_passes * (2 * n_tokens + 1))} |")


def bf16_drift(model_fp32, model_fast, rm_input, budget, seed) -> None:
    """Score drift of bf16 rows against fp32 rows on the same coalitions, and what it does to SHAP values."""
    if model_fast.explain_dtype == "float32":
        print("\nbf16 drift: rows already fp32 (--no-bf16 or no native bf16)")
        return
    exact, fast = CoalitionEvaluator(model_fp32), CoalitionEvaluator(model_fast)
    masks = np.random.default_rng(seed).random((256, rm_input.n_tokens)) < 0.5
    a, b = exact(rm_input, masks), fast(rm_input, masks)
    phi_exact = explain_shap(lambda m: exact(rm_input, m), rm_input.n_tokens, max_rows=budget, seed=seed).values
    phi_fast = explain_shap(lambda m: fast(rm_input, m), rm_input.n_tokens, max_rows=budget, seed=seed).values
    print(f"\nbf16 drift on 256 random coalitions: max |delta score| {np.abs(a - b).max():.4f} "
          f"({np.abs(a - b).max() / a.std():.3f} of the score std {a.std():.3f}); "
          f"shap values fp32 vs bf16 at the same seed: spearman {spearmanr(phi_exact, phi_fast)[0]:.3f}, "
          f"max |delta| {np.abs(phi_exact - phi_fast).max():.4f} of max |phi| {np.abs(phi_exact).max():.4f}")


_WORKER = {}


def _init(model_dir: str) -> None:
    from workers.evaluator import set_torch_threads
    from workers.model import RewardModel

    set_torch_threads(1)
    _WORKER["model"] = RewardModel.load(model_dir)
    _WORKER["evaluator"] = CoalitionEvaluator(_WORKER["model"])


def _explain(job) -> float:
    prompt, response, budget, seed = job
    inp = _WORKER["model"].encode(prompt, response)
    ev = _WORKER["evaluator"]
    start = time.perf_counter()
    explain_shap(lambda m: ev(inp, m), inp.n_tokens, max_rows=budget, seed=seed)
    return time.perf_counter() - start


def process_per_core(model_dir: str, jobs, processes: int = 2) -> float:
    """Seconds per response when `processes` single-thread workers explain `jobs` concurrently (warm)."""
    ctx = multiprocessing.get_context("spawn")  # torch is not fork-safe once threads exist
    with ProcessPoolExecutor(processes, mp_context=ctx, initializer=_init, initargs=(model_dir,)) as pool:
        list(pool.map(_explain, jobs[:processes]))  # warm-up in every worker
        start = time.perf_counter()
        list(pool.map(_explain, jobs))
        return (time.perf_counter() - start) / len(jobs)
