"""Serving state of the amortized credit head (issue 15): which head answers, how faithful it is live, what to learn.

One `AmortizedCredit` per loaded RM. The engine asks it for the current head, hands it every full-budget shap
explanation as a training example, and reports audits (a sampled fraction of amortized answers also explained at
full budget); a background trainer (`service/credit_trainer.py` in the embedded server) takes the examples, fits a
new version and publishes it here. Everything is guarded by one lock and nothing here blocks on the RM: the engine
thread only appends to a bounded buffer and reads a reference.

Fallback: when the live fidelity of a mode (mean Spearman of its last `audit_window` audits against the full-budget
estimate) drops below `min_spearman`, that mode is answered by the permutation estimator at full budget (which
also feeds training) until a new head version is published, whose audits start afresh.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Deque, Dict, List, Optional

import numpy as np

from workers.credit_head import CreditHead, Example, head_dir, latest_head_path

__all__ = ["AmortizedCredit", "CreditStats", "MODES"]

log = logging.getLogger("tokencredit.credit")

MODES = ("amortized", "amortized+k")


@dataclass
class CreditStats:
    """Counters for /metrics, read at scrape time."""

    examples: int = 0  # training examples offered (full-budget explanations)
    dropped: int = 0  # examples dropped because the buffer was full
    trainings: int = 0  # head versions published by this process
    audits: Dict[str, int] = field(default_factory=lambda: {m: 0 for m in MODES})
    fallbacks: Dict[str, int] = field(default_factory=lambda: {m: 0 for m in MODES})


class AmortizedCredit:
    """The current head of one RM revision, its audits and its training buffer.

    Args:
        rm_name, rm_revision: the RM this state belongs to (heads of other revisions are never loaded).
        root: cache root (default `<cache>`), checkpoints in `head_dir(rm_name, rm_revision, root)`.
        audit_fraction: share of amortized answers also explained at full budget (0 disables audits).
        min_spearman: live fidelity below which a mode falls back to the permutation estimator.
        audit_window: audits averaged into the live fidelity; min_audits: audits needed before a fallback.
        collect: keep full-budget explanations as training examples.
        max_examples: training buffer size (oldest dropped first).
        seed: of the audit sampler.
    """

    def __init__(
        self,
        rm_name: str,
        rm_revision: str,
        *,
        root: Optional[os.PathLike] = None,
        audit_fraction: float = 0.05,
        min_spearman: float = 0.8,
        audit_window: int = 20,
        min_audits: int = 5,
        collect: bool = True,
        max_examples: int = 5000,
        seed: int = 0,
    ):
        self.rm_name, self.rm_revision = rm_name, rm_revision
        self.directory = head_dir(rm_name, rm_revision, root)
        self.audit_fraction = float(audit_fraction)
        self.min_spearman = float(min_spearman)
        self.min_audits = int(min_audits)
        self.collect = collect
        self.stats = CreditStats()
        self._lock = threading.Lock()
        self._rng = np.random.default_rng(seed)
        self._window = int(audit_window)
        self._audits: Dict[str, Deque[float]] = {m: collections.deque(maxlen=self._window) for m in MODES}
        self._examples: Deque[Example] = collections.deque(maxlen=int(max_examples))
        self._new_examples = 0
        self._arrived = threading.Condition(self._lock)
        self.head: Optional[CreditHead] = None

    # -- heads ----------------------------------------------------------------------------------------------------
    def load_latest(self) -> Optional[CreditHead]:
        """Load the newest checkpoint of this RM revision, if any (a broken file is logged and skipped)."""
        path = latest_head_path(self.directory)
        if path is None:
            return None
        try:
            head = CreditHead.load(path)
        except Exception as exc:  # noqa: BLE001 - a bad file must not stop the server
            log.warning("credit head %s not loaded (%s: %s)", path, type(exc).__name__, exc)
            return None
        if (head.rm_name, head.rm_revision) != (self.rm_name, self.rm_revision):
            log.warning("credit head %s belongs to %s@%s, not %s@%s; ignored", path, head.rm_name, head.rm_revision,
                        self.rm_name, self.rm_revision)
            return None
        self._swap(head)
        log.info("credit head v%d loaded from %s (%d training responses)", head.version, path, head.examples)
        return head

    def next_version(self) -> int:
        from workers.credit_head import list_versions

        versions = list_versions(self.directory)
        current = self.head.version if self.head is not None else 0
        return max([current, *versions]) + 1

    def publish(self, head: CreditHead, save: bool = True) -> Optional[Path]:
        """Make `head` the one that answers (saved first, atomically, when `save`); audits start afresh."""
        path = head.save(self.directory) if save else None
        self._swap(head)
        with self._lock:
            self.stats.trainings += 1
        return path

    def _swap(self, head: CreditHead) -> None:
        with self._lock:
            self.head = head
            for window in self._audits.values():
                window.clear()

    # -- audits and fallback ------------------------------------------------------------------------------------
    def should_audit(self) -> bool:
        with self._lock:
            return self.audit_fraction > 0 and float(self._rng.random()) < self.audit_fraction

    def record_audit(self, mode: str, version: int, rho: float) -> None:
        """One audit of `mode` by head `version` (ignored when another version answers by now)."""
        with self._lock:
            self.stats.audits[mode] += 1
            if self.head is not None and self.head.version == version and np.isfinite(rho):
                self._audits[mode].append(float(rho))

    def live_spearman(self, mode: str) -> Optional[float]:
        with self._lock:
            window = list(self._audits[mode])
        return float(np.mean(window)) if window else None

    def falls_back(self, mode: str) -> bool:
        """True when `mode`'s live fidelity is measured (≥ min_audits) and below `min_spearman`."""
        with self._lock:
            window = list(self._audits[mode])
        return len(window) >= self.min_audits and float(np.mean(window)) < self.min_spearman

    def count_fallback(self, mode: str) -> None:
        with self._lock:
            self.stats.fallbacks[mode] += 1

    # -- training examples --------------------------------------------------------------------------------------
    def offer(self, example: Example) -> None:
        """Keep a training example (never blocks; the oldest goes when the buffer is full)."""
        with self._lock:
            if len(self._examples) == self._examples.maxlen:
                self.stats.dropped += 1
            self._examples.append(example)
            self._new_examples += 1
            self.stats.examples += 1
            self._arrived.notify_all()

    def wait_for_examples(self, new: int, total: int, timeout: float) -> Optional[List[Example]]:
        """Block until at least `new` examples arrived since the last call that returned and `total` are held;
        then return a snapshot of the buffer (None on timeout)."""
        with self._arrived:
            ready = self._arrived.wait_for(
                lambda: self._new_examples >= new and len(self._examples) >= total, timeout=timeout
            )
            if not ready:
                return None
            self._new_examples = 0
            return list(self._examples)

    @property
    def held_examples(self) -> int:
        with self._lock:
            return len(self._examples)


# ----------------------------------------------------------------------------------------------------------------
# The shap explainer's amortized estimators (called from workers/registry.py)

# Audits draw their permutations from another seed than the request's: "amortized+k" reads pass 0 of the request's
# seed, and a reference sharing it would share its noise (an optimistic fidelity).
AUDIT_SEED_OFFSET = 1_000_003


def unavailable(credit: Optional["AmortizedCredit"], estimator: str, rm: str) -> Optional[str]:
    """Why `estimator` cannot be served for this RM now, or None when it can (the engine's 422 message)."""
    head = credit.head if credit is not None else None
    if head is None:
        return (f"no credit head is trained for {rm} yet: pre-train one with `tokencredit-server distill --model DIR "
                f"--data prompts.jsonl`, or let the server learn one from full-budget shap requests "
                f"(estimator \"stratified\", default max_rows)")
    if estimator == "amortized+k" and head.plus is None:
        return f"credit head v{head.version} of {rm} has no amortized+k head (it was trained without per-pass estimates)"
    return None


def explain_amortized(x, cfg):
    """Shapley values from the credit head ("amortized": alone; "amortized+k": correcting one stratified pass),
    projected so that Σ values = R − f(∅). Audits a sampled fraction against the full-budget estimate; a mode whose
    live fidelity fell below the threshold is answered by the permutation estimator at full budget instead."""
    from workers.credit_head import project_efficient, spearman, token_features
    from workers.explainers import explain_shap, permutation_shapley, stratified_rows
    from workers.explained import Explained

    credit, mode, T = x.credit, cfg.estimator, x.n_tokens
    head = credit.head if credit is not None else None
    if head is None:  # prepare refuses this with a 422; a head cannot disappear, so this is a bug
        raise RuntimeError(unavailable(credit, mode, "this RM"))
    if credit.falls_back(mode):
        credit.count_fallback(mode)
        att = explain_shap(x.value_fn, T, seed=cfg.seed)
        collect(x, cfg.model_copy(update={"estimator": "stratified", "max_rows": None}), att)
        return Explained(att.values, "exact" if att.exact else "stratified")
    features = x.features
    if features is None:  # a causal RM: its hidden states cost a forward pass of their own
        features = token_features(x.evaluator.model, x.rm_input)
        x.counter.rows += 1
        x.counter.calls += 1
    estimate = None
    if mode == "amortized":
        empty = float(x.value_fn(np.zeros((1, T), dtype=bool))[0])
    else:
        one = permutation_shapley(x.value_fn, T, max_rows=stratified_rows(T, head.passes), seed=cfg.seed)
        empty = one.base_value
        estimate = project_efficient(np.asarray(one.values, dtype=np.float64), x.score - empty)
    delta = x.score - empty
    values = head.predict(features, delta, estimate)
    if credit.should_audit():
        reference = explain_shap(x.value_fn, T, seed=cfg.seed + AUDIT_SEED_OFFSET)
        credit.record_audit(mode, head.version, spearman(values, reference.values))
        collect(x, cfg.model_copy(update={"estimator": "stratified", "max_rows": None}), reference, features)
    return Explained(values, mode, credit_head_version=head.version)


def collect(x, cfg, att, features=None) -> None:
    """Offer a full-budget explanation (the default estimator at ≥ the default budget, or exact values) to the
    credit head's training buffer; costs one more forward pass (the hidden states) unless the features are known
    (`features`, or the engine's from the score pass of an encoder RM)."""
    from workers.credit_head import example_from, token_features
    from workers.explainers import default_shap_rows

    credit = x.credit
    if credit is None or not credit.collect:
        return
    full_budget = att.exact or (
        cfg.estimator == "stratified" and (cfg.max_rows is None or cfg.max_rows >= default_shap_rows(x.n_tokens))
    )
    if not full_budget:
        return
    features = features if features is not None else x.features
    if features is None:
        features = token_features(x.evaluator.model, x.rm_input)
        x.counter.rows += 1
        x.counter.calls += 1
    credit.offer(example_from(features, x.score, att))
