"""Forward passes shared by the items of a micro-batch: the sequence score R and the attention row of many inputs in
a few padded passes, instead of one pass per item.

The service's micro-batcher (`service/batching.py`) coalesces items of concurrent requests; `run_batch` explains
them with the engine as each request's own `Engine.run` would, except that the two one-row passes every item needs
(its score R and, for `attention`, its attention row) run together: inputs sorted by length, right-padded per chunk
and masked, identical inputs once. The coalition rows of shap, lime and loo stay per item (their chunks are full
already). Same arithmetic, other fp32 rounding (padded batches, and oneDNN's matmul for the score where it is
faster than MKL's: `row_backends.onednn_linears`): the score an item gets in a batch differs from the one it gets
alone by ~1e-6 of its value, and its token rewards are conserved against the score it got. An item alone in its
batch runs exactly `Engine.run`'s passes.

No I/O: it only calls the engine and the model.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from tokencredit.types import Component, DenseRewardsRequest, ShapingWeights
from workers.engine import Engine, EngineOutput, PreparedItem
from workers.model import RewardModel, RMInput
from workers.row_backends import eager_attention, onednn_linears

__all__ = ["run_batch", "shared_scores", "shared_attention_rows", "can_share"]

# Padded tokens per score pass (rows × longest row): past a few thousand the fp32 matmuls are full on CPU.
SCORE_TOKENS = 8192
# Attention weights per attention pass (rows × length², every layer's kept by HF): bounds its memory.
ATTENTION_CELLS = 1 << 18

Group = Tuple[DenseRewardsRequest, ShapingWeights, List[PreparedItem]]


def can_share(model: RewardModel) -> bool:
    """Padded passes read every row where the RM reads it: encoders (their head reads position 0) and causal RMs
    whose score we read ourselves (at each row's last real id; right padding is invisible to it)."""
    return model.kind == "encoder" or model.reads_last_position


def run_batch(engine: Engine, groups: Sequence[Group]) -> List[EngineOutput]:
    """Explain `groups` (request, weights, its prepared items in this batch) as one batch; one output per group."""
    inputs: List[RMInput] = []
    wants_attention: List[bool] = []
    for request, weights, prepared in groups:
        attention = Component.attention in engine.components_for(request, weights)
        inputs.extend(p.rm_input for p in prepared)
        wants_attention.extend([attention] * len(prepared))
    if len(inputs) < 2 or not can_share(engine.model):
        return [engine.run(request, weights, prepared) for request, weights, prepared in groups]
    scores = shared_scores(engine.model, inputs)
    attention_inputs = [inp for inp, wanted in zip(inputs, wants_attention) if wanted]
    rows = shared_attention_rows(engine.model, attention_inputs) if len(attention_inputs) > 1 else []
    with engine.evaluator.shared(
        {id(inp): s for inp, s in zip(inputs, scores)},
        {id(inp): r for inp, r in zip(attention_inputs, rows)},
    ):
        return [engine.run(request, weights, prepared) for request, weights, prepared in groups]


def _unique(inputs: Sequence[RMInput]) -> Tuple[List[RMInput], np.ndarray]:
    """Distinct inputs (same ids and token types) and, for each input, the index of its distinct one."""
    index: Dict[bytes, int] = {}
    distinct: List[RMInput] = []
    where = np.empty(len(inputs), dtype=np.int64)
    for k, inp in enumerate(inputs):
        key = inp.input_ids.tobytes() + b"|" + (b"" if inp.token_type_ids is None else np.asarray(inp.token_type_ids).tobytes())
        if key not in index:
            index[key] = len(distinct)
            distinct.append(inp)
        where[k] = index[key]
    return distinct, where


def _chunks(lengths: np.ndarray, cost) -> List[np.ndarray]:
    """Indices sorted by length, cut so that each chunk's `cost(rows, longest)` stays within budget (≥ 1 row)."""
    order = np.argsort(lengths, kind="stable")
    chunks, start = [], 0
    for end in range(1, len(order) + 1):
        if end == len(order) or not cost(end + 1 - start, int(lengths[order[end]])):
            chunks.append(order[start:end])
            start = end
    return chunks


def _padded(model: RewardModel, inputs: Sequence[RMInput]):
    """ids, attention mask and token types [N, longest], right-padded (the pad id, mask 0, type 0)."""
    import torch

    width = max(len(inp.input_ids) for inp in inputs)
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else model.mask_token_id
    ids = np.full((len(inputs), width), pad, dtype=np.int64)
    mask = np.zeros((len(inputs), width), dtype=np.int64)
    types = None if inputs[0].token_type_ids is None else np.zeros((len(inputs), width), dtype=np.int64)
    for k, inp in enumerate(inputs):
        n = len(inp.input_ids)
        ids[k, :n], mask[k, :n] = inp.input_ids, 1
        if types is not None:
            types[k, :n] = inp.token_type_ids
    as_tensor = lambda a: None if a is None else torch.from_numpy(a).to(model.device)  # noqa: E731
    return as_tensor(ids), as_tensor(mask), as_tensor(types)


def shared_scores(model: RewardModel, inputs: Sequence[RMInput], max_tokens: int = SCORE_TOKENS) -> np.ndarray:
    """The sequence score R of each input (full precision, as `CoalitionEvaluator.score`), float64 [N]."""
    import torch

    distinct, where = _unique(inputs)
    lengths = np.array([len(inp.input_ids) for inp in distinct])
    out = np.empty(len(distinct), dtype=np.float64)
    net = _score_net(model)
    with torch.inference_mode():
        for chunk in _chunks(lengths, lambda rows, longest: rows * longest <= max_tokens):
            part = [distinct[k] for k in chunk]
            ids, mask, types = _padded(model, part)
            if model.reads_last_position:
                # Causal: each row read at its own last id; the padding after it is never attended to.
                read = np.array([len(inp.input_ids) - 1 for inp in part])
                logits = net.score(model._causal_hidden(net, ids, None, None, read))
            else:
                kwargs = {"attention_mask": mask}
                if types is not None:
                    kwargs["token_type_ids"] = types
                logits = net(input_ids=ids, **kwargs).logits
            out[chunk] = model._logits_to_score(logits)
    return out[where]


def _score_net(model: RewardModel):
    """The full-precision network for shared score passes: the RM with oneDNN linears where that works on this
    machine (`row_backends.onednn_linears`: ×1.6 on the demo RM), else the RM itself. Built once per model."""
    net = getattr(model, "_shared_score_net", None)
    if net is None:
        net = onednn_linears(model.model) or model.model
        model._shared_score_net = net
    return net


def shared_attention_rows(model: RewardModel, inputs: Sequence[RMInput], max_cells: int = ATTENTION_CELLS) -> List[np.ndarray]:
    """Each input's ABC row (as `RewardModel.attention_row`): last-layer attention of its scoring position over its
    response tokens, heads averaged."""
    import torch

    distinct, where = _unique(inputs)
    lengths = np.array([len(inp.input_ids) for inp in distinct])
    rows: List[Optional[np.ndarray]] = [None] * len(distinct)
    with torch.inference_mode(), eager_attention(model.model):
        for chunk in _chunks(lengths, lambda n, longest: n * longest * longest <= max_cells):
            part = [distinct[k] for k in chunk]
            ids, mask, types = _padded(model, part)
            kwargs = {"attention_mask": mask, "output_attentions": True}
            if types is not None:
                kwargs["token_type_ids"] = types
            last = model.model(input_ids=ids, **kwargs).attentions[-1].float().mean(dim=1)  # [n, L, L]
            for j, (k, inp) in enumerate(zip(chunk, part)):
                row = last[j, inp.score_position].double().cpu().numpy()
                rows[k] = row[inp.response_positions]
    return [rows[k] for k in where]
