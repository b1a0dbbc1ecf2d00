"""Coalition rows of an encoder RM that compute the last layer at the scoring position only.

An encoder RM's head reads one position ([CLS]/<s>, position 0). Every layer but the last must run at all positions
(each position's state feeds the next layer's keys and values), but in the last layer only position 0's query,
attention output and feed-forward reach the score: the last layer needs keys and values at every position and
nothing else. For MiniLM-L6 (6 layers, 384 wide, FFN 1536) at 72 tokens that skips 14 % of a row's matmul
FLOPs with the same arithmetic (tests compare it to the full model; bench/attribution.py measures the saving).

Supported: BERT and RoBERTa-family sequence classifiers whose layers are the plain post-norm blocks (self-attention
only, no cross-attention, no feed-forward chunking). Anything else gets None and its rows run the full model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import SequenceClassifierOutput

__all__ = ["score_position_rows", "ScorePositionRows"]

# Sequence classifiers whose head reads only position 0: "pooler" = BertPooler on [CLS] then the classifier;
# "head" = the classifier itself takes the sequence and reads features[:, 0] (RoBERTa's classification head).
_HEADS = {
    "BertForSequenceClassification": "pooler",
    "RobertaForSequenceClassification": "head",
    "XLMRobertaForSequenceClassification": "head",
}


def _plain_layer(layer) -> bool:
    attention = getattr(layer, "attention", None)
    inner = getattr(attention, "self", None)
    needed = (hasattr(inner, name) for name in ("query", "key", "value", "num_attention_heads", "attention_head_size"))
    return (
        inner is not None
        and all(needed)
        and hasattr(attention, "output")
        and hasattr(layer, "intermediate")
        and hasattr(layer, "output")
        and not getattr(layer, "add_cross_attention", False)
        and not getattr(layer, "is_decoder", False)
        and getattr(layer, "chunk_size_feed_forward", 0) == 0
    )


def score_position_rows(model) -> "ScorePositionRows | None":
    """The row network for `model` if its architecture is supported, else None (rows then run the full model)."""
    head = _HEADS.get(type(model).__name__)
    base = getattr(model, "base_model", None)
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    if head is None or layers is None or len(layers) == 0 or not all(_plain_layer(layer) for layer in layers):
        return None
    if head == "pooler" and getattr(base, "pooler", None) is None:
        return None
    return ScorePositionRows(model, head)


class ScorePositionRows(torch.nn.Module):
    """Called like the HF model (`input_ids`, `token_type_ids`; `.logits` on the result) for unpadded rows."""

    def __init__(self, model, head: str):
        super().__init__()
        self.model = model
        self.head = head

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        # Rows are never padded (masked tokens are replaced, not removed), so no attention mask is needed;
        # `attention_mask` is accepted for the HF calling convention only.
        base = self.model.base_model
        hidden = base.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        *early, last = base.encoder.layer
        for layer in early:
            out = layer(hidden)
            hidden = out[0] if isinstance(out, tuple) else out
        first = _last_layer_at_first_position(last, hidden)  # [n, 1, d]
        if self.head == "pooler":
            logits = self.model.classifier(self.model.dropout(base.pooler(first)))
        else:
            logits = self.model.classifier(first)
        return SequenceClassifierOutput(logits=logits)


def _last_layer_at_first_position(layer, hidden):
    """The post-norm block (attention → add & norm → FFN → add & norm) with one query: position 0."""
    attention = layer.attention.self
    n, length, _ = hidden.shape
    heads, size = attention.num_attention_heads, attention.attention_head_size
    first = hidden[:, :1]
    query = attention.query(first).view(n, 1, heads, size).transpose(1, 2)
    key = attention.key(hidden).view(n, length, heads, size).transpose(1, 2)
    value = attention.value(hidden).view(n, length, heads, size).transpose(1, 2)
    scale = getattr(attention, "scaling", size ** -0.5)
    context = F.scaled_dot_product_attention(query, key, value, scale=scale)
    context = context.transpose(1, 2).reshape(n, 1, heads * size)
    attended = layer.attention.output(context, first)
    return layer.output(layer.intermediate(attended), attended)
