"""The coalition evaluator: the only code that runs the reward model.

A coalition is a boolean mask over the response's RM tokens (True = token kept). Masked tokens are replaced by
the mask id in place, so every row has the prompt's and the response's exact length: no re-tokenization, no
padding inside a batch, and the prompt is never touched. Identical masks are evaluated once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from workers.model import RewardModel, RMInput

__all__ = ["CoalitionEvaluator", "RowCounter", "set_torch_threads"]


def set_torch_threads(threads: int) -> None:
    """One thread per worker process by default: two spinning threads per core were up to 35× slower under load."""
    import torch

    torch.set_num_threads(max(1, int(threads)))


@dataclass
class RowCounter:
    """RM rows actually evaluated (after de-duplication), for `usage.rm_rows`."""

    rows: int = 0
    calls: int = 0
    requested: int = 0
    per_method: dict = field(default_factory=dict)


class CoalitionEvaluator:
    """Evaluates f(mask) = RM score of the response with unmasked tokens only, for a batch of masks.

    Args:
        model: the loaded reward model.
        chunk_size: rows per forward pass; None picks 64 on CPU (bf16/fp32 matmuls are full by then) and 256 on GPU.
        dedup: evaluate identical masks once (a switch so the benchmark can measure what it saves).
    """

    def __init__(self, model: RewardModel, chunk_size: int | None = None, dedup: bool = True):
        self.model = model
        self.dedup = dedup
        self.chunk_size = chunk_size or (256 if model.device.startswith("cuda") else 64)

    def __call__(
        self, rm_input: RMInput, masks: np.ndarray, counter: RowCounter | None = None, low_precision: bool = True
    ) -> np.ndarray:
        """Scores of each mask row.

        Args:
            rm_input: the laid-out (prompt, response).
            masks: bool [N, T] over the T response tokens; True keeps the token.
            counter: optional accumulator of rows evaluated.
            low_precision: run rows at the model's `explain_dtype` (the sequence score uses full precision).

        Returns:
            float64 [N] scores, one per mask row (duplicates share one evaluation).
        """
        import torch

        masks = np.asarray(masks, dtype=bool)
        if masks.ndim != 2 or masks.shape[1] != rm_input.n_tokens:
            raise ValueError(f"masks must be bool [N, {rm_input.n_tokens}], got shape {masks.shape}")
        if len(masks) == 0:
            return np.zeros(0, dtype=np.float64)
        # Dedup on packed bits: permutation sampling repeats the empty and full coalitions every pass.
        if self.dedup:
            packed = np.packbits(masks, axis=1)
            _, first, inverse = np.unique(packed, axis=0, return_index=True, return_inverse=True)
            unique_masks = masks[first]
        else:
            unique_masks, inverse = masks, np.arange(len(masks))
        n = len(unique_masks)
        rows = np.broadcast_to(rm_input.input_ids, (n, len(rm_input.input_ids))).copy()
        response_ids = rm_input.response_ids
        rows[:, rm_input.response_positions] = np.where(unique_masks, response_ids[None, :], self.model.mask_token_id)
        type_rows = None
        if rm_input.token_type_ids is not None:
            type_rows = np.broadcast_to(rm_input.token_type_ids, rows.shape).copy()
        out = np.empty(n, dtype=np.float64)
        model = self.model
        cache = None
        prefix = int(rm_input.response_positions[0])
        if model.reads_last_position and model.kv_reuse and prefix > 0:
            # Causal RM: the prompt is never masked, so its keys/values are computed once and only the response
            # columns run per row (exact: the response attends to the same prompt states).
            with torch.inference_mode():
                cache = model.prompt_cache(rm_input.input_ids[:prefix], low_precision)
            rows = rows[:, prefix:]
        # Equal chunks (129 rows → 43+43+43, not 64+64+1): a 1-row forward costs nearly as much as a full one.
        n_chunks = -(-n // self.chunk_size)
        bounds = np.linspace(0, n, n_chunks + 1).round().astype(int)
        with torch.inference_mode():
            for start, stop in zip(bounds[:-1], bounds[1:]):
                chunk_types = None if type_rows is None else type_rows[start:stop]
                out[start:stop] = model.scores(rows[start:stop], chunk_types, low_precision, cache)
        if counter is not None:
            counter.rows += n
            counter.requested += len(masks)
            counter.calls += 1
        return out[inverse.reshape(-1)]

    def score(self, rm_input: RMInput, counter: RowCounter | None = None) -> float:
        """The unmasked sequence score R."""
        return float(self(rm_input, np.ones((1, rm_input.n_tokens), dtype=bool), counter, low_precision=False)[0])

    def attention(self, rm_input: RMInput, counter: RowCounter | None = None) -> np.ndarray:
        """ABC credit: last-layer attention of the scoring position over response tokens (one forward pass)."""
        row = self.model.attention_row(rm_input)
        if counter is not None:
            counter.rows += 1
            counter.calls += 1
        return row
