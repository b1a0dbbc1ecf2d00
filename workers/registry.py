"""The explainer table: everything the server knows about each explained component, written once.

One `Explainer` per component but `sparse` (which explains nothing: the score goes on the last token): how it
explains one item, its `methods.<name>` settings type, how many RM rows it asks for, what budget check it needs
before any row runs, and whether it needs a causal RM. The engine explains, validates and warms up from this
table, the Celery dispatcher sizes micro-batches from it, and `/v1/info` and the admin API list the components an
RM can compute from it. Adding an explainer = a function in `workers/explainers.py`, its config in
`tokencredit/types.py` (`Component`, `ShapingWeights`, `MethodsConfig`), one row here, and its tests
(`tests/test_registry.py` runs the shaping invariants on every row).

No I/O here: the RM runs only through the `CoalitionEvaluator` an `ExplainInput` carries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Tuple, Type, Union

import numpy as np
from pydantic import BaseModel

from tokencredit.types import (
    AttentionConfig,
    Component,
    LimeConfig,
    LooConfig,
    MethodsConfig,
    PrefixConfig,
    ShapConfig,
    ShapingWeights,
)
from workers import shaping
from workers.explainers import (
    default_lime_samples,
    default_shap_rows,
    explain_lime,
    explain_loo,
    explain_shap,
    min_shap_rows,
)
from workers.explained import Explained, ExplainInput

__all__ = [
    "Explainer",
    "ExplainInput",
    "Explained",
    "REGISTRY",
    "config_for",
    "item_rows",
    "supports",
    "computable_components",
    "uncomputable",
]


@dataclass(frozen=True)
class Explainer:
    component: Component
    # Its `methods.<name>` settings; the default instance applies when the request names none.
    config: Type[BaseModel]
    explain: Callable[[ExplainInput, BaseModel], Explained]
    # RM rows one item of T response tokens asks for (before de-duplication; shap: its budget, an upper bound).
    rows: Callable[[int, BaseModel], int]
    # Needs a causal RM (scores read at every position).
    requires_causal: bool = False
    # A budget the item's token count rules out: (settings field, why), checked before any row runs.
    check: Optional[Callable[[int, BaseModel], Optional[Tuple[str, str]]]] = None

    @property
    def name(self) -> str:
        return self.component.value


# ------------------------------------------------------------------------------------------------ the rows
def _attention(x: ExplainInput, cfg: AttentionConfig) -> Explained:
    # ABC: R · a_t with Σ a = 1 (all on the placement token when the attention row is all zero).
    share = shaping.normalize_nonnegative(x.evaluator.attention(x.rm_input, x.counter), x.placement)
    return Explained(x.score * share)


def _shap(x: ExplainInput, cfg: ShapConfig) -> Explained:
    from workers import credit_serving

    if cfg.estimator in credit_serving.MODES:
        return credit_serving.explain_amortized(x, cfg)
    att = explain_shap(x.value_fn, x.n_tokens, estimator=cfg.estimator, max_rows=cfg.max_rows, seed=cfg.seed)
    credit_serving.collect(x, cfg, att)  # a full-budget explanation becomes a training example of the credit head
    return Explained(att.values, "exact" if att.exact else cfg.estimator)


def _shap_rows(n_tokens: int, cfg: ShapConfig) -> int:
    if cfg.estimator == "amortized":  # the score's hidden states and f(∅)
        return 2
    if cfg.estimator == "amortized+k":  # the hidden states and one stratified pass
        return 1 + 2 * n_tokens
    return cfg.max_rows if cfg.max_rows else default_shap_rows(n_tokens)


def _shap_check(n_tokens: int, cfg: ShapConfig) -> Optional[Tuple[str, str]]:
    if cfg.max_rows is None or cfg.estimator in ("amortized", "amortized+k"):
        return None
    minimum = min_shap_rows(n_tokens, cfg.estimator)
    if cfg.max_rows < minimum:
        return "max_rows", f"{cfg.estimator} SHAP needs max_rows >= {minimum}"
    return None


def _lime(x: ExplainInput, cfg: LimeConfig) -> Explained:
    return Explained(explain_lime(x.value_fn, x.n_tokens, num_samples=cfg.num_samples, seed=cfg.seed,
                                  kernel_width=cfg.kernel_width).values)


def _lime_rows(n_tokens: int, cfg: LimeConfig) -> int:
    # The perturbed samples, then the full response once more for f(x).
    return (cfg.num_samples if cfg.num_samples else default_lime_samples(n_tokens)) + 1


def _loo(x: ExplainInput, cfg: LooConfig) -> Explained:
    return Explained(explain_loo(x.value_fn, x.n_tokens).values)


def _prefix(x: ExplainInput, cfg: PrefixConfig) -> Explained:
    # v_t = s_t − s_{t−1}; they telescope to s_T − s_0, so the base R − Σv is the prompt's own score s_0 (plus
    # R − s_T where the score is read after text that follows the response, e.g. a template).
    return Explained(np.diff(x.evaluator.prefix_scores(x.rm_input, x.counter)))


def _one_row(n_tokens: int, cfg: BaseModel) -> int:
    return 1


REGISTRY: Dict[Component, Explainer] = {
    e.component: e
    for e in (
        Explainer(Component.attention, AttentionConfig, _attention, _one_row),
        Explainer(Component.shap, ShapConfig, _shap, _shap_rows, check=_shap_check),
        Explainer(Component.lime, LimeConfig, _lime, _lime_rows),
        # The full response, each token left out, and the empty coalition (for the base).
        Explainer(Component.loo, LooConfig, _loo, lambda n_tokens, cfg: n_tokens + 2),
        Explainer(Component.prefix, PrefixConfig, _prefix, _one_row, requires_causal=True),
    )
}


# ------------------------------------------------------------------------------------------------ readers
def config_for(component: Component, methods: Optional[MethodsConfig]) -> BaseModel:
    """The request's settings for `component`, else its defaults."""
    given = getattr(methods, component.value, None) if methods is not None else None
    return given if given is not None else REGISTRY[component].config()


def item_rows(n_tokens: int, methods: Optional[MethodsConfig], components: Iterable[Component]) -> int:
    """RM rows one item will cost (before de-duplication): the score, then each explained component's rows."""
    rows = 1
    for c in components:
        if c in REGISTRY:
            rows += REGISTRY[c].rows(n_tokens, config_for(c, methods))
    return rows


def supports(component: Component, model) -> bool:
    """Whether `model` (a loaded `RewardModel`, weightless or not) can compute `component`."""
    entry = REGISTRY.get(component)
    return entry is None or not entry.requires_causal or bool(model.reads_last_position)


def computable_components(model) -> List[str]:
    """The components `model` can compute, in declaration order (`sparse` always)."""
    return [c.value for c in Component if supports(c, model)]


def uncomputable(weights: Union[ShapingWeights, Mapping[str, float]], model) -> List[str]:
    """Components with a positive weight that `model` cannot compute."""
    values = weights.as_dict() if isinstance(weights, ShapingWeights) else weights
    return [name for name, w in values.items() if w > 0 and not supports(Component(name), model)]
