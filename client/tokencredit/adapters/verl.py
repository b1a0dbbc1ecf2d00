"""verl adapters (written against verl v0.9.0; `verl` is imported only by the reward-manager classes).

Tier S: `reward.custom_reward_function.path=<this file>` and `reward.custom_reward_function.name=compute_score`
(`custom_reward_function.*` before v0.9). verl auto-detects the `async def` and awaits it per sample.
The URL comes from `TOKENCREDIT_URL`; the prompt, when verl's `extra_info` carries one, from `extra_info["prompt"]`
(else the response is scored alone).

Tier D: `reward.reward_manager.source=importlib`, `reward.reward_manager.module.path=<this file>`,
`reward.reward_manager.name=DenseRewardManager` (v0.8+, reward loop; `assemble_rm_scores` writes the vector), or
`LegacyDenseRewardManager` with `reward_model.use_reward_loop=False` (≤ v0.7.0). Both produce the (bs, R)
`rm_scores` layout with `dense_rm_scores`: reward k on response token k, zeros under `response_mask == 0`.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence

from tokencredit.adapters import lazy_classes
from tokencredit.client import AsyncClient, Client

__all__ = ["compute_score", "dense_rm_scores", "DenseRewardManager", "LegacyDenseRewardManager"]

_async_client: Optional[AsyncClient] = None
_sync_client: Optional[Client] = None


def _url() -> str:
    return os.environ.get("TOKENCREDIT_URL", "http://127.0.0.1:8000")


async def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs) -> Dict[str, Any]:
    """verl custom reward function (tier S): the RM score of `solution_str`.

    Returns:
        `{"score": float}`. A failure raises (verl's `limit` manager would otherwise turn it into a 0.0 reward).
    """
    global _async_client
    if _async_client is None:
        # One client per worker process; it keeps one connection pool per event loop.
        _async_client = AsyncClient(_url())
    prompt = str((extra_info or {}).get("prompt", "")) if isinstance(extra_info, dict) else ""
    [score] = await _async_client.scores([{"prompt": prompt, "response": solution_str}], on_error="raise")
    return {"score": float(score)}


def dense_rm_scores(token_rewards: Sequence[Optional[Sequence[float]]], response_mask, valid_lengths=None):
    """Dense rewards into verl's `rm_scores` layout.

    Args:
        token_rewards: Per sample, one reward per *policy* token (positions with `response_mask == 1` within the
            valid length, in order), or None for a failed sample (its row becomes NaN: never a silent 0).
        response_mask (`(bs, R)` tensor): 1 on tokens the policy generated, 0 on tool / observation tokens and padding.
        valid_lengths (`(bs,)` tensor, *optional*): valid response lengths (`attention_mask[:, P:].sum(-1)`);
            defaults to the index after the last mask-1 position.

    Returns:
        `(bs, R)` float32 tensor: reward k on the k-th policy position, 0 under `response_mask == 0`.

    Raises:
        ValueError: If a sample's reward count differs from its policy positions.
    """
    import torch

    mask = response_mask.bool()
    out = torch.zeros(mask.shape, dtype=torch.float32)
    for b, rewards in enumerate(token_rewards):
        row = mask[b].clone()
        if valid_lengths is not None:
            row[int(valid_lengths[b]):] = False
        positions = row.nonzero().flatten()
        if rewards is None:
            out[b, positions] = float("nan")
            continue
        if len(rewards) != len(positions):
            raise ValueError(f"sample {b}: {len(rewards)} token rewards for {len(positions)} policy tokens")
        out[b, positions] = torch.tensor(list(rewards), dtype=torch.float32)
    return out


def _response_mask(data):
    # A TensorDict's get() without a default raises in some tensordict versions: test membership instead.
    return data.batch["response_mask"] if "response_mask" in data.batch.keys() else None


def _policy_items(data, tokenizer) -> tuple:
    """(items, per-sample policy ids) from a DataProto: the policy's own response ids where the mask is 1."""
    responses = data.batch["responses"]
    mask = _response_mask(data)
    prompt_len = data.batch["prompts"].shape[-1]
    valid = data.batch["attention_mask"][:, prompt_len:].sum(-1)
    items = []
    for b in range(responses.shape[0]):
        keep = (mask[b] if mask is not None else responses[b].new_ones(responses[b].shape)).bool()
        keep[int(valid[b]):] = False
        ids = responses[b][keep].tolist()
        prompt_ids = data.batch["prompts"][b][data.batch["attention_mask"][b, :prompt_len].bool()].tolist()
        items.append({"prompt": tokenizer.decode(prompt_ids, skip_special_tokens=True), "response_token_ids": ids})
    return items, valid


def _dense(data, tokenizer) -> List:
    global _sync_client
    if _sync_client is None:
        _sync_client = Client(_url())
    items, valid = _policy_items(data, tokenizer)
    results = _sync_client.dense_rewards(items, tokenizer=tokenizer)
    mask = _response_mask(data)
    mask = mask if mask is not None else data.batch["responses"].new_ones(data.batch["responses"].shape)
    return dense_rm_scores([None if r is None else r.token_rewards for r in results], mask, valid)


def _classes():
    from verl.experimental.reward_loop.reward_manager.base import RewardManagerBase  # v0.8+

    class DenseRewardManager(RewardManagerBase):
        """Reward-loop manager: `reward_score` is the per-token list; `assemble_rm_scores` writes it as-is."""

        async def run_single(self, data) -> Dict[str, Any]:
            import asyncio

            dense = await asyncio.to_thread(_dense, data[-1:], self.tokenizer)
            row = dense[0]
            return {"reward_score": row.tolist(), "reward_extra_info": {"tokencredit_score": float(row.nansum())}}

        @classmethod
        def assemble_rm_scores(cls, data, scores):
            import torch

            return torch.tensor(scores, dtype=torch.float32)

    return DenseRewardManager


def _legacy_class():
    from verl.workers.reward_manager.abstract import AbstractRewardManager  # ≤ v0.7.0

    class LegacyDenseRewardManager(AbstractRewardManager):
        """Batch manager (`reward_model.use_reward_loop=False`): returns the dense `reward_tensor` directly."""

        def __init__(self, tokenizer, num_examine=0, compute_score=None, reward_fn_key="data_source", **kwargs):
            self.tokenizer = tokenizer

        def __call__(self, data, return_dict: bool = False):
            tensor = _dense(data, self.tokenizer)
            if return_dict:
                return {"reward_tensor": tensor, "reward_extra_info": {"tokencredit_score": tensor.nansum(-1).tolist()}}
            return tensor

    return LegacyDenseRewardManager


# verl loads the manager class by name from this file; built then, so compute_score never imports verl.
__getattr__ = lazy_classes(__name__, globals(), {"DenseRewardManager": _classes, "LegacyDenseRewardManager": _legacy_class})
