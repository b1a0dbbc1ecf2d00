"""Result-cache keys: everything that can change an item's answer, and nothing else.

The key covers the model revision (content hash of config + weights), the method config (explainers run,
budgets, seeds), the shaping weights (their values: two weight versions with equal values give equal answers,
so keying on values is the same as keying on the version, minus needless misses), the prompt, the response (and the
whole conversation of a `messages` item) and the policy tokenization (offsets, or ids plus the tokenizer directory).
Retries and duplicate rollouts then cost no RM rows. Values live in Redis with a TTL (`cache_ttl_s`); workers write them, the API reads them.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import List, Optional

from tokencredit.types import DenseRewardItem, DenseRewardsRequest, ShapingWeights

__all__ = ["item_cache_key", "request_shared_part"]


def request_shared_part(
    request: DenseRewardsRequest, weights: ShapingWeights, components: List[str], revision: str, numerics: str = ""
) -> dict:
    """The part of the key shared by all items of a request. `numerics` names how rows are computed (row dtype,
    compiled or not): those change answers in the last digits, so a switch must not serve old cached answers."""
    methods = request.methods.model_dump(mode="json") if request.methods is not None else None
    # Every other request-level option (normalization, residual placement, what to return) changes the answer:
    # taken whole, so a field added later cannot be forgotten here.
    options = request.model_dump(
        mode="json", exclude={"items", "weights", "shaping_version", "deadline_ms", "policy_tokenizer", "methods"}
    )
    return {
        "revision": revision,
        "numerics": numerics,
        "components": components,
        "methods": methods,
        "weights": weights.as_dict(),
        "options": options,
        "policy_tokenizer": os.path.realpath(request.policy_tokenizer) if request.policy_tokenizer else None,
    }


def item_cache_key(shared: dict, item: DenseRewardItem) -> Optional[str]:
    """sha256 over the shared part and the item's own inputs (its id is not part of the answer)."""
    body = {
        **shared,
        "prompt": item.prompt,
        "response": item.response,
        "offsets": item.response_token_offsets,
        "ids": item.response_token_ids,
    }
    if item.messages is not None:
        # The whole conversation (history, tool calls, content blocks): two histories with the same response differ.
        # Only messages items carry the key, so prompt/response items keep the keys they had.
        body["messages"] = [m.model_dump(mode="json", exclude_none=True) for m in item.messages]
    blob = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()
