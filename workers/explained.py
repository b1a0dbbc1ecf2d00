"""What an explainer of the table (`workers/registry.py`) is given for one item and what it gives back.

A module of its own, below the registry, so that explainer implementations elsewhere in `workers/` (the credit head's
`credit_serving`) can build an `Explained` without importing the registry that imports them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import numpy as np

if TYPE_CHECKING:
    from workers.evaluator import CoalitionEvaluator, RowCounter
    from workers.model import RMInput

__all__ = ["ExplainInput", "Explained"]


@dataclass
class ExplainInput:
    """What an explainer sees of one item: its laid-out input, the evaluator bound to it, and its score R."""

    evaluator: "CoalitionEvaluator"
    rm_input: "RMInput"
    counter: "RowCounter"
    score: float
    # Where a distribution with no mass puts it ("last" or "uniform"; the request's residual_placement).
    placement: str
    # The RM's amortized-credit state (workers/credit_serving.AmortizedCredit), or None: serves the "amortized"
    # shap estimators and collects full-budget explanations as the head's training examples.
    credit: Optional[object] = None
    # The credit head's view of the unmasked input (workers/credit_head.TokenFeatures) when the engine already has it.
    features: Optional[object] = None

    @property
    def n_tokens(self) -> int:
        return self.rm_input.n_tokens

    def value_fn(self, masks: np.ndarray) -> np.ndarray:
        """f(mask) on this item: the explainers' set function."""
        return self.evaluator(self.rm_input, masks, counter=self.counter)


@dataclass
class Explained:
    """One component's values on the RM's response tokens (the base is R − Σ values, taken by the engine)."""

    values: np.ndarray
    # shap only: the estimator that produced the values ("exact" when every coalition was enumerated).
    estimator: Optional[str] = None
    # shap only: the credit head version that produced them (amortized estimators).
    credit_head_version: Optional[int] = None
