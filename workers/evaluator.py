"""The coalition evaluator: the engine's one way to run the reward model.

Coalition rows, the sequence score, the attention row and the prefix scores all go through it, so every RM
row an explanation costs is counted here (`RowCounter`); the forward passes themselves are `RewardModel`'s
(`scores`, `attention_row`, `prefix_scores`).

A coalition is a boolean mask over the response's RM tokens (True = token kept). How a row leaves the other tokens
out is the model's value function (`RewardModel.masking`):

* encoder RMs, and causal RMs under "replace": absent ids are overwritten with the mask id, so every row has the
  input's exact length (no re-tokenization, no padding);
* causal "attention": rows keep every id and position, and an attention mask hides the absent tokens;
* causal "delete" / "ellipsis": absent tokens are cut out (or each run becomes "..."), so rows differ in length;
  they are sorted by length, right-padded per chunk, and each is read at its own last id.

The prompt (and a chat template's text around the response) is never touched, and a causal row's score is never
read at an absent token (`RewardModel.read_positions`). Identical masks are evaluated once.
"""

from __future__ import annotations

import contextlib
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
        # Scores and attention rows computed for a micro-batch's items in shared passes (`shared`), by id(rm_input).
        self._shared_scores: dict = {}
        self._shared_attention: dict = {}

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
        with torch.inference_mode():
            if self.model.masking in ("delete", "ellipsis"):
                out = self._ragged_rows(rm_input, unique_masks, low_precision)
            else:
                out = self._fixed_rows(rm_input, unique_masks, low_precision)
        if counter is not None:
            counter.rows += len(unique_masks)
            counter.requested += len(masks)
            counter.calls += 1
        return out[inverse.reshape(-1)]

    def _prompt_cache(self, rm_input: RMInput, low_precision: bool):
        """The KV cache of the ids before the response, when rows may reuse it (causal RM, something to cache)."""
        model = self.model
        if model.reads_last_position and model.kv_reuse and rm_input.response_start > 0:
            # The prompt is never masked, so its keys/values are computed once and only the columns after it run
            # per row (exact: every row attends to the same prompt states at the same positions).
            return model.prompt_cache(rm_input.input_ids[: rm_input.response_start], low_precision)
        return None

    def _chunks(self, n: int):
        # Equal chunks (129 rows → 43+43+43, not 64+64+1): a 1-row forward costs nearly as much as a full one.
        n_chunks = -(-n // self.chunk_size)
        bounds = np.linspace(0, n, n_chunks + 1).round().astype(int)
        return zip(bounds[:-1], bounds[1:])

    def _fixed_rows(self, rm_input: RMInput, keep: np.ndarray, low_precision: bool) -> np.ndarray:
        """"replace" (any RM) and "attention" (causal): rows of the input's own length."""
        model = self.model
        n, length = len(keep), len(rm_input.input_ids)
        rows = np.broadcast_to(rm_input.input_ids, (n, length)).copy()
        visible = None
        if model.masking == "attention":
            visible = np.ones((n, length), dtype=bool)
            visible[:, rm_input.response_positions] = keep
        else:
            rows[:, rm_input.response_positions] = np.where(keep, rm_input.response_ids[None, :], model.mask_token_id)
        type_rows = None
        if rm_input.token_type_ids is not None:
            type_rows = np.broadcast_to(rm_input.token_type_ids, rows.shape).copy()
        read = model.read_positions(rm_input, keep) if model.reads_last_position else None
        cache = self._prompt_cache(rm_input, low_precision)
        if cache is not None:
            rows, read = rows[:, cache.length :], read - cache.length
            visible = None if visible is None else visible[:, cache.length :]
        if read is not None and np.all(read == rows.shape[1] - 1):
            read = None  # every row is read at its last column: the plain path
        return self._run(rows, type_rows, visible, read, cache, low_precision)

    def _ragged_rows(self, rm_input: RMInput, keep: np.ndarray, low_precision: bool) -> np.ndarray:
        """"delete" and "ellipsis" (causal): absent tokens cut out, so rows differ in length."""
        model = self.model
        ids, start, end = rm_input.input_ids, rm_input.response_start, rm_input.response_end
        response = rm_input.response_ids
        cache = self._prompt_cache(rm_input, low_precision)
        head = ids[:start] if cache is None else ids[:0]
        tail = ids[end:]
        if model.masking == "delete":
            middles = [response[k] for k in keep]
        else:
            middles = [_with_ellipses(response, k, model.ellipsis_ids) for k in keep]
        pieces = [np.concatenate([head, middle, tail]) for middle in middles]
        lengths = np.array([len(p) for p in pieces], dtype=np.int64)
        # Right-padded (the padding follows each row's reading column, so no row ever sees it) and sorted by
        # length, so each chunk is cut to little more than its own rows (`RewardModel.scores` drops the columns
        # after a chunk's last reading column).
        order = np.argsort(lengths, kind="stable")
        rows = np.full((len(pieces), max(1, int(lengths.max()))), model.mask_token_id, dtype=np.int64)
        for i, piece in enumerate(pieces):
            rows[i, : len(piece)] = piece
        result = np.empty(len(pieces), dtype=np.float64)
        result[order] = self._run(rows[order], None, None, lengths[order] - 1, cache, low_precision)
        return result

    def _run(self, rows, type_rows, visible, read, cache, low_precision: bool) -> np.ndarray:
        """Scores of the rows in balanced chunks. A causal row whose reading column is inside the cached prompt
        (read < 0: no response token kept, nothing after the response) takes the prompt's own score; with no
        prompt at all, the empty text is worth 0.0 (as `RewardModel.prefix_scores` entry 0)."""
        n = len(rows)
        out = np.empty(n, dtype=np.float64)
        live = np.arange(n)
        if read is not None:
            out[read < 0] = cache.last_score if cache is not None else 0.0
            live = np.flatnonzero(read >= 0)
        for lo, hi in self._chunks(len(live)):
            index = live[lo:hi]
            causal = {}  # causal rows only: encoder rows keep `scores`' original call
            if visible is not None:
                causal["visible"] = visible[index]
            if read is not None:
                causal["read_at"] = read[index]
            types = None if type_rows is None else type_rows[index]
            out[index] = self.model.scores(rows[index], types, low_precision, cache, **causal)
        return out

    def score(self, rm_input: RMInput, counter: RowCounter | None = None) -> float:
        """The unmasked sequence score R."""
        if id(rm_input) in self._shared_scores:
            self._count_one_pass(counter)
            return float(self._shared_scores[id(rm_input)])
        return float(self(rm_input, np.ones((1, rm_input.n_tokens), dtype=bool), counter, low_precision=False)[0])

    def attention(self, rm_input: RMInput, counter: RowCounter | None = None) -> np.ndarray:
        """ABC credit: last-layer attention of the scoring position over response tokens (one forward pass)."""
        row = self._shared_attention.get(id(rm_input))
        row = self.model.attention_row(rm_input) if row is None else row
        self._count_one_pass(counter)
        return row

    @contextlib.contextmanager
    def shared(self, scores: dict, attention: dict):
        """Within the block, `score` and `attention` answer from these (keyed by id(rm_input)), computed for a
        micro-batch's items in shared padded passes (workers/shared_rows.py); each still counts its one row."""
        self._shared_scores, self._shared_attention = scores, attention
        try:
            yield self
        finally:
            self._shared_scores, self._shared_attention = {}, {}

    def prefix_scores(self, rm_input: RMInput, counter: RowCounter | None = None) -> np.ndarray:
        """A causal RM's score after each response prefix, float64 [T + 1] (one forward pass)."""
        scores = self.model.prefix_scores(rm_input)
        self._count_one_pass(counter)
        return scores

    @staticmethod
    def _count_one_pass(counter: RowCounter | None) -> None:
        if counter is not None:
            counter.rows += 1
            counter.requested += 1
            counter.calls += 1


def _with_ellipses(response: np.ndarray, keep: np.ndarray, ellipsis_ids) -> np.ndarray:
    """The response's kept ids with each run of absent ones replaced by the ids of "..." once (shap's Text masker
    with `collapse_mask_token`)."""
    parts = []
    previous_kept = True
    for i, kept in enumerate(keep):
        if kept:
            parts.append(response[i : i + 1])
        elif previous_kept:
            parts.append(ellipsis_ids(i == 0))
        previous_kept = kept
    return np.concatenate(parts) if parts else response[:0]
