"""What `dense_rewards` returns: plain lists, with numpy / torch conversions on request."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

__all__ = ["Attribution", "DenseReward", "Step", "as_numpy", "as_torch", "step_tensor"]


@dataclass
class Attribution:
    """One component's explanation of the score, on the same tokens as the rewards: Σ values + base = score.

    Attributes:
        values (`list[float]`): one value per token, in score units (shap: Shapley values; lime: coefficients;
            loo: f(x) − f(x without t); prefix: s_t − s_{t−1}; attention: score · attention share).
        base (`float`): what the tokens do not explain (shap: the score with every response token masked).
        exact (`bool`, *optional*): shap only: True for exact Shapley values (all coalitions enumerated).
    """

    values: List[float]
    base: float
    exact: Optional[bool] = None


@dataclass
class Step:
    """One step of the response (`aggregate={"steps": ...}`): Σ of its tokens' rewards.

    Attributes:
        span (`tuple[int, int]`): characters [start, end) of the response.
        tokens (`tuple[int, int]`): entries [first, end) of `token_rewards` (a token belongs to the step holding its
            first character; one without characters to the step of the character before it).
        reward (`float`): Σ token_rewards[first:end]; the steps sum to the score.
    """

    span: Tuple[int, int]
    tokens: Tuple[int, int]
    reward: float


@dataclass
class DenseReward:
    """Dense rewards of one item.

    Attributes:
        id (`str`): the item's id (the caller's, else its index in the call).
        score (`float`): the reward model's sequence score R.
        token_rewards (`list[float]`): one reward per policy token (per RM token when none were given); Σ = score.
        spans (`list[tuple[int, int]]`): character spans into the response, one per reward.
        coverage (`float`): share of the explained mass that landed on the token carrying it.
        degraded (`bool`): True when the dense call failed and `on_error="fallback"` put the score on the last token.
        attributions (`dict[str, Attribution]`, *optional*): per explained component, its values and base
            (with `return_attributions=True`).
        steps (`list[Step]`, *optional*): per-step rewards (with `aggregate={"steps": ...}`).
        prompt_truncated (`bool`): the prompt (or the oldest messages) was cut from the left to fit the RM.

    Example:
        >>> r = DenseReward(id="0", score=1.0, token_rewards=[0.25, 0.75])
        >>> r.as_numpy().sum()
        np.float64(1.0)
    """

    id: str
    score: float
    token_rewards: List[float]
    spans: List[Tuple[int, int]] = field(default_factory=list)
    coverage: float = 1.0
    degraded: bool = False
    attributions: Optional[Dict[str, Attribution]] = None
    steps: Optional[List[Step]] = None
    prompt_truncated: bool = False

    def as_numpy(self, dtype="float64"):
        import numpy as np

        return np.asarray(self.token_rewards, dtype=dtype)

    def as_torch(self, dtype=None, device=None):
        import torch

        return torch.tensor(self.token_rewards, dtype=dtype or torch.float32, device=device)


def _rows(results: Sequence[Optional[DenseReward]], length: Optional[int]):
    n = max([len(r.token_rewards) for r in results if r is not None] + [0]) if length is None else length
    return n, [None if r is None else r.token_rewards[:n] for r in results]


def as_numpy(results: Sequence[Optional[DenseReward]], length: Optional[int] = None, pad: float = 0.0,
             missing: float = float("nan"), dtype="float32"):
    """Stack results into a right-padded `(batch, length)` array.

    Args:
        results: Output of `dense_rewards`; a None (skipped item) becomes a row of `missing` (NaN by default,
            never 0, so a failed item cannot pass for a neutral one).
        length: Columns; defaults to the longest result. Longer results are cut (their sum changes: pad the
            trainer's own tensor instead when that matters).
        pad: Value after the end of each row.
    """
    import numpy as np

    n, rows = _rows(results, length)
    out = np.full((len(rows), n), pad, dtype=dtype)
    for i, row in enumerate(rows):
        if row is None:
            out[i, :] = missing
        else:
            out[i, : len(row)] = row
    return out


def as_torch(results: Sequence[Optional[DenseReward]], length: Optional[int] = None, pad: float = 0.0,
             missing: float = float("nan"), dtype=None, device=None):
    """Like `as_numpy`, as a float32 torch tensor."""
    import torch

    array = as_numpy(results, length=length, pad=pad, missing=missing)
    return torch.as_tensor(array, dtype=dtype or torch.float32, device=device)


def step_tensor(results: Sequence[Optional[DenseReward]], length: int, missing: float = float("nan"), dtype=None,
                device=None):
    """PRM-style `(batch, length)` rewards: each step's reward on the last token of the step (0 elsewhere).

    Args:
        results: Output of `dense_rewards(..., aggregate={"steps": ...})`; None becomes a row of `missing`.
        length: Columns (the trainer's completion length); a step whose last token is beyond it is cut away.
    """
    import torch

    out = torch.zeros((len(results), length), dtype=dtype or torch.float32, device=device)
    for i, r in enumerate(results):
        if r is None:
            out[i, :] = missing
            continue
        if r.steps is None:
            raise ValueError(f"results[{i}] has no steps: ask for them with aggregate={{'steps': ...}}")
        for step in r.steps:
            first, end = step.tokens
            if first < end <= length:
                out[i, end - 1] += step.reward
    return out
