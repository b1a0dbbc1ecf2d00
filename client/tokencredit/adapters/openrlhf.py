"""OpenRLHF adapters (≥ v0.9.1, one sample per reward call; `openrlhf` is imported only by `AgentExecutor`).

Tier S, HTTP (no code): `--reward.remote_url http://HOST:PORT/openrlhf/get_reward` (`--remote_rm_url` before
v0.10.2); the service answers OpenRLHF's JSON exactly (`service/routes/compat.py`).

Tier S, file: `--reward.remote_url $(python -c "import tokencredit.adapters.openrlhf as m; print(m.__file__)")`.
OpenRLHF loads this file and calls `reward_func(queries, prompts, labels)` from many threads at once (it runs it
through `asyncio.to_thread`); the one process-wide `Client` is thread-safe. The URL comes from `TOKENCREDIT_URL`.

Tier D (dense, version-pinned plugin): `--train.agent_func_path <this file>` loads `AgentExecutor`, which runs the
stock single-turn executor and adds `token_rewards` (one per action token, on the policy's own ids). OpenRLHF
stores step tensors with shape (B, A), A = T − 1 (`action_mask = action_mask[1:]`), so entry k of an action span
(s, e) of the sequence lands at A-index s + k − 1: `place_token_rewards` does that and is what a patched
`compute_reward` adds before the KL term (`dense_compute_reward`).
"""

from __future__ import annotations

import os
import threading
from typing import Any, Dict, Optional, Sequence, Tuple

from tokencredit.adapters import lazy_classes
from tokencredit.client import Client

__all__ = ["reward_func", "place_token_rewards", "dense_compute_reward", "response_of", "AgentExecutor"]

_client: Optional[Client] = None
_client_lock = threading.Lock()


def _shared_client() -> Client:
    global _client
    with _client_lock:
        if _client is None:
            _client = Client(os.environ.get("TOKENCREDIT_URL", "http://127.0.0.1:8000"),
                             on_error=os.environ.get("TOKENCREDIT_ON_ERROR", "raise"))
        return _client


def response_of(query: str, prompt: Optional[str]) -> Tuple[str, str]:
    """(prompt, response) from OpenRLHF's `query` (= decode(prompt + response)) and formatted prompt."""
    if prompt and query.startswith(prompt):
        return prompt, query[len(prompt):]
    return "", query


def reward_func(queries: Sequence[str], prompts: Sequence[str], labels: Sequence[Any], **kwargs) -> Dict[str, Any]:
    """OpenRLHF custom reward function: the RM score of each query (tier S).

    Returns:
        `{"rewards": Tensor[B], "scores": Tensor[B], "extra_logs": {"tokencredit_score": Tensor[B]}}`.
        A failure raises (OpenRLHF then keeps `reward=None` and stops the step: better than training on a 0).
    """
    import torch

    items = [dict(zip(("prompt", "response"), response_of(q, p))) for q, p in zip(queries, prompts)]
    scores = _shared_client().scores(items) if items else []
    values = torch.tensor([float("nan") if s is None else s for s in scores], dtype=torch.float32)
    return {"rewards": values, "scores": values.clone(), "extra_logs": {"tokencredit_score": values.clone()}}


def place_token_rewards(token_rewards: Sequence[Sequence[float]], action_ranges: Sequence[Sequence[Tuple[int, int]]],
                        num_actions: int):
    """Dense rewards into OpenRLHF's (B, A) step layout.

    Args:
        token_rewards: Per sample, the rewards of its action tokens, in order (all spans concatenated).
        action_ranges: Per sample, the `(start, end)` sequence positions of its action (policy) tokens.
        num_actions: A = T − 1, the width of OpenRLHF's step tensors.

    Returns:
        `(B, A)` float32 tensor: reward k of span (s, e) at A-index s + k − 1 (the `[1:]` shift), 0 elsewhere.

    Raises:
        ValueError: If a sample's reward count differs from its action tokens, or a span leaves the tensor.
    """
    import torch

    out = torch.zeros(len(token_rewards), num_actions, dtype=torch.float32)
    for b, (rewards, ranges) in enumerate(zip(token_rewards, action_ranges)):
        n = sum(e - s for s, e in ranges)
        if n != len(rewards):
            raise ValueError(f"sample {b}: {len(rewards)} token rewards for {n} action tokens in {list(ranges)}")
        k = 0
        for s, e in ranges:
            if s < 1 or e - 1 > num_actions:
                raise ValueError(f"sample {b}: action span ({s}, {e}) does not fit A = {num_actions} (needs 1 <= s, e <= A + 1)")
            out[b, s - 1:e - 1] = torch.tensor(rewards[k:k + e - s], dtype=torch.float32)
            k += e - s
    return out


def dense_compute_reward(dense, kl_coef: float, kl, action_mask):
    """What a patched `openrlhf.models.utils.compute_reward` returns: dense (B, A) rewards plus the KL term.

    The stock function scatters a clamped scalar at the last action index, then adds `-kl_coef · kl`; here the
    TokenCredit rewards (Σ = the RM score) take the scalar's place. Group baselines (`group_norm`, `rloo`, ...)
    must be applied to the scalar only, before this: the dense part redistributes that same scalar over tokens.
    """
    return (dense - kl_coef * kl) * action_mask.to(dense.dtype)


def _agent_executor_class():
    from openrlhf.utils.agent import SingleTurnAgentExecutor  # ≥ v0.9.1

    class AgentExecutor(SingleTurnAgentExecutor):
        """The stock single-turn executor plus `token_rewards`, one per action token, from TokenCredit."""

        async def execute(self, prompt, label, sampling_params, max_length, hf_tokenizer, llm_engine, images=None, **kw):
            import asyncio

            out = await super().execute(prompt, label, sampling_params, max_length, hf_tokenizer, llm_engine, images=images, **kw)
            tokens = list(out["observation_tokens"])
            action_ids = [t for s, e in out["action_ranges"] for t in tokens[s:e]]
            prompt_text = hf_tokenizer.decode(tokens[: out["action_ranges"][0][0]], skip_special_tokens=True)
            item = {"prompt": prompt_text, "response_token_ids": action_ids}
            [dense] = await asyncio.to_thread(_shared_client().dense_rewards, [item], tokenizer=hf_tokenizer)
            out["token_rewards"] = None if dense is None else dense.token_rewards
            return out

    return AgentExecutor


# OpenRLHF reads `AgentExecutor` with getattr on the loaded module: built then, so the scalar tier and the
# layout helpers never import openrlhf.
__getattr__ = lazy_classes(__name__, globals(), {"AgentExecutor": _agent_executor_class})

