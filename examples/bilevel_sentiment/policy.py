"""SmolLM2-135M-Instruct as a PPO policy on 2 CPU cores: frozen trunk, trainable top layers, value head.

Only the last `n_trainable` decoder layers (and the final norm) learn. That is what makes PPO affordable here,
and it also makes the reference policy cheap: the frozen trunk's hidden states are the same for the policy and
the reference, so each rollout runs the trunk once (`Trunk`) and the reference is a frozen copy of the top alone.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Tuple

import torch
from torch import nn

# Re-exported: run.py and train.py import the weights helper from here.
from workers.smollm2 import GGUF_FILE, ensure_policy_weights  # noqa: F401


def load_policy(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()
    return tokenizer, model


@dataclass
class Trunk:
    """What the frozen layers produce for a batch of sequences; inputs of every top-layer pass."""

    hidden: torch.Tensor  # (B, L, H) output of the last frozen layer
    mask: object  # the causal + padding mask the decoder layers take
    position_ids: torch.Tensor
    position_embeddings: Tuple[torch.Tensor, torch.Tensor]


def position_ids_for(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as `generate` computes them."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 1)


class BiasedHead(nn.Module):
    """The LM head plus a learned logit bias; `generate` samples through it, so rollouts use the bias too."""

    def __init__(self, base: nn.Module, bias: nn.Parameter):
        super().__init__()
        self.base, self.bias = base, bias

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.base(hidden) + self.bias


class SplitPolicy(nn.Module):
    """A causal LM cut into a frozen trunk and a trainable top, plus a value head and a frozen reference top.

    With `logit_bias`, a per-token bias on the logits learns too (the output embedding itself is tied to the
    input embedding, so it stays frozen). It is the cheapest way for a 2-layer budget to change *which words*
    the policy says, which is what a sentiment reward asks for; the reference has no bias.
    """

    def __init__(self, model, n_trainable: int = 2, logit_bias: bool = False):
        super().__init__()
        self.lm = model
        for p in model.parameters():
            p.requires_grad_(False)
        layers = model.model.layers
        self.n_frozen = len(layers) - n_trainable
        self.top = nn.ModuleList(layers[self.n_frozen:])
        self.norm = model.model.norm
        for p in list(self.top.parameters()) + list(self.norm.parameters()):
            p.requires_grad_(True)
        # The reference policy differs from the policy only in the top, so only the top is copied.
        self.ref_top = copy.deepcopy(self.top).requires_grad_(False)
        self.ref_norm = copy.deepcopy(self.norm).requires_grad_(False)
        self.base_head = model.lm_head
        self.logit_bias = None
        if logit_bias:
            self.logit_bias = nn.Parameter(torch.zeros(model.config.vocab_size))
            model.lm_head = BiasedHead(self.base_head, self.logit_bias)
        hidden = model.config.hidden_size
        self.value_head = nn.Linear(hidden, 1)
        nn.init.normal_(self.value_head.weight, std=1.0 / (hidden ** 0.5) * 0.1)
        nn.init.zeros_(self.value_head.bias)

    def trainable_parameters(self):
        return self.layer_parameters() + ([self.logit_bias] if self.logit_bias is not None else [])

    def layer_parameters(self):
        return list(self.top.parameters()) + list(self.norm.parameters()) + list(self.value_head.parameters())

    @torch.no_grad()
    def trunk(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Trunk:
        from transformers.masking_utils import create_causal_mask

        body = self.lm.model
        embeds = body.embed_tokens(input_ids)
        position_ids = position_ids_for(attention_mask)
        mask = create_causal_mask(config=body.config, inputs_embeds=embeds, attention_mask=attention_mask,
                                  past_key_values=None, position_ids=position_ids)
        position_embeddings = body.rotary_emb(embeds, position_ids=position_ids)
        hidden = embeds
        for layer in body.layers[: self.n_frozen]:
            hidden = layer(hidden, attention_mask=mask, position_ids=position_ids,
                           position_embeddings=position_embeddings)
        return Trunk(hidden, mask, position_ids, position_embeddings)

    def head(self, trunk: Trunk, reference: bool = False, rows=None):
        """Logits (B, L, V) and values (B, L) from the top layers; `reference` uses the frozen copy."""
        layers, norm = (self.ref_top, self.ref_norm) if reference else (self.top, self.norm)
        rows = slice(None) if rows is None else rows
        hidden = trunk.hidden[rows]
        mask = trunk.mask[rows] if isinstance(trunk.mask, torch.Tensor) else trunk.mask
        pe = tuple(t[rows] if t.shape[0] == trunk.hidden.shape[0] else t for t in trunk.position_embeddings)
        for layer in layers:
            hidden = layer(hidden, attention_mask=mask, position_ids=trunk.position_ids[rows], position_embeddings=pe)
        hidden = norm(hidden)
        logits = self.base_head(hidden) if reference else self.lm.lm_head(hidden)
        values = None if reference else self.value_head(hidden).squeeze(-1)
        return logits, values
