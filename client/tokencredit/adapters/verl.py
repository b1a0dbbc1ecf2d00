"""verl adapters, tested against verl 0.9.1 (`tests/test_adapters_verl.py` runs verl's own reward loop and agent
loop in `.venv-verl`). `verl` is imported only when a verl-specific class is first used.

Tier S: `reward.custom_reward_function.path=<this file>` and `reward.custom_reward_function.name=compute_score`
(async; verl's reward loop awaits it per sample), or `name=compute_score_sync` for the legacy batch managers
(`verl.workers.reward_manager`), which call the function synchronously.

Tier D (dense, the default agent-loop path):
    actor_rollout_ref.rollout.agent.agent_loop_manager_class=tokencredit.adapters.verl.DenseAgentLoopManager
    reward.reward_manager.source=importlib reward.reward_manager.module.path=<this file>
    reward.reward_manager.name=DenseRewardManager
`DenseRewardManager.run_single` returns one reward per response position (0 on tool tokens); the agent loop's
own post-processing would write a scalar at the last token, so `DenseAgentLoopWorker` writes the vector into
`rm_scores` instead: reward k on response token k, no shift.

The prompt comes from verl's `raw_prompt` (the chat messages the policy saw), sent as `messages` so the service
renders it with the RM's chat template; without it, from `extra_info["prompt"]` or the decoded prompt ids.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Dict, List, Optional, Sequence

from tokencredit.adapters import lazy_classes
from tokencredit.client import AsyncClient, Client

__all__ = ["compute_score", "compute_score_sync", "dense_rm_scores", "DenseRewardManager", "DenseAgentLoopWorker",
           "DenseAgentLoopManager", "LegacyDenseRewardManager"]

logger = logging.getLogger(__name__)

_async_client: Optional[AsyncClient] = None
_sync_client: Optional[Client] = None
# The agent loop hands its unpadded response mask to the reward manager under this `extra_fields` key (verl's
# streaming reward path sends no `response_mask`), and gets the dense row back under the other.
_MASK_KEY = "tokencredit_response_mask"
_ROW_KEY = "tokencredit_token_rewards"
_MESSAGE_KEYS = ("role", "content", "tool_calls", "tool_call_id", "name")
_warned_no_prompt = False


def _url() -> str:
    return os.environ.get("TOKENCREDIT_URL", "http://127.0.0.1:8000")


def _sync() -> Client:
    global _sync_client
    if _sync_client is None:
        _sync_client = Client(_url())
    return _sync_client


def chat_messages(raw_prompt: Any) -> List[Dict[str, Any]]:
    """verl's `raw_prompt` (a list or numpy array of message dicts) as plain OpenAI-style messages.

    Keys the service does not know (verl datasets may carry e.g. `loss_mask`) are dropped, as are None values.
    """
    messages = []
    for message in list(raw_prompt):
        message = dict(message)
        messages.append({k: message[k] for k in _MESSAGE_KEYS if message.get(k) is not None})
    return messages


def _score_item(solution_str: str, extra_info: Any) -> Dict[str, Any]:
    """The item `compute_score` sends: the conversation when verl passes `raw_prompt`, else prompt + response."""
    global _warned_no_prompt
    info = extra_info if isinstance(extra_info, dict) else {}
    # On the agent-loop path verl merges the loop's extra fields, `raw_prompt` among them, into `extra_info`.
    if info.get("raw_prompt") is not None:
        return {"messages": chat_messages(info["raw_prompt"]) + [{"role": "assistant", "content": solution_str}]}
    if info.get("prompt") is None and not _warned_no_prompt:
        _warned_no_prompt = True
        logger.warning("tokencredit: neither extra_info['raw_prompt'] nor extra_info['prompt']: responses are scored "
                       "without their prompt")
    return {"prompt": str(info.get("prompt", "")), "response": solution_str}


async def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs) -> Dict[str, Any]:
    """verl custom reward function (tier S, reward loop): the RM score of `solution_str` after its prompt.

    Returns:
        `{"score": float}`. A failure raises (verl's `limit` manager would otherwise turn it into a 0.0 reward).
    """
    global _async_client
    if _async_client is None:
        # One client per worker process; it keeps one connection pool per event loop.
        _async_client = AsyncClient(_url())
    [score] = await _async_client.scores([_score_item(solution_str, extra_info)], on_error="raise")
    return {"score": float(score)}


def compute_score_sync(data_source, solution_str, ground_truth, extra_info=None, **kwargs) -> Dict[str, Any]:
    """`compute_score` for verl's legacy batch managers, which call the reward function synchronously."""
    [score] = _sync().scores([_score_item(solution_str, extra_info)], on_error="raise")
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


def _response_masks(data):
    """Per sample, the response mask (1 = policy token): the batch's, the agent loop's (handed over in
    `tool_extra_fields`), or all ones."""
    import torch

    responses = data.batch["responses"]
    if "response_mask" in data.batch.keys():  # TensorDict.get without a default raises in some versions
        return data.batch["response_mask"]
    masks = torch.ones_like(responses)
    extra = data.non_tensor_batch.get("tool_extra_fields")
    for b in range(responses.shape[0]):
        fields = extra[b] if extra is not None else None
        if isinstance(fields, dict) and fields.get(_MASK_KEY) is not None:
            given = torch.tensor(list(fields[_MASK_KEY]), dtype=responses.dtype)[: responses.shape[1]]
            masks[b, : len(given)] = given
    return masks


def _policy_items(data, tokenizer) -> tuple:
    """(items, valid lengths) from a DataProto: the policy's own response ids where the mask is 1, after the
    conversation verl rendered for the policy (`raw_prompt`) or, without it, the decoded prompt ids."""
    responses = data.batch["responses"]
    mask = _response_masks(data)
    prompt_len = data.batch["prompts"].shape[-1]
    valid = data.batch["attention_mask"][:, prompt_len:].sum(-1)
    raw_prompts = data.non_tensor_batch.get("raw_prompt")
    items = []
    for b in range(responses.shape[0]):
        keep = mask[b].bool().clone()
        keep[int(valid[b]):] = False
        ids = responses[b][keep].tolist()
        if raw_prompts is not None:
            # The client decodes `ids` (special tokens skipped) into the assistant message's text.
            text = tokenizer.decode(ids, skip_special_tokens=True)
            messages = chat_messages(raw_prompts[b]) + [{"role": "assistant", "content": text}]
            items.append({"messages": messages, "response_token_ids": ids})
        else:
            prompt_ids = data.batch["prompts"][b][data.batch["attention_mask"][b, :prompt_len].bool()].tolist()
            items.append({"prompt": tokenizer.decode(prompt_ids, skip_special_tokens=True), "response_token_ids": ids})
    return items, valid, mask


def _dense(data, tokenizer):
    """`(bs, R)` dense rewards for a DataProto (R = its `responses` width) and the per-sample RM scores."""
    items, valid, mask = _policy_items(data, tokenizer)
    results = _sync().dense_rewards(items, tokenizer=tokenizer)
    rows = [None if r is None else r.token_rewards for r in results]
    return dense_rm_scores(rows, mask, valid), [None if r is None else r.score for r in results]


def _classes():
    import asyncio

    import torch
    from verl.experimental.reward_loop.reward_manager.base import RewardManagerBase

    class DenseRewardManager(RewardManagerBase):
        """Reward-loop manager: `reward_score` is one reward per response position (reward k on token k).

        Constructed by verl's `load_reward_manager(config, tokenizer, compute_score, **reward_kwargs)`; the reward
        loop adds `reward_router_address` and `reward_model_tokenizer` (unused here: the service is the RM).
        """

        def __init__(self, config, tokenizer, compute_score=None, reward_router_address=None,
                     reward_model_tokenizer=None, **kwargs):
            super().__init__(config, tokenizer, compute_score)

        async def run_single(self, data) -> Dict[str, Any]:
            dense, [score] = await asyncio.to_thread(_dense, data[-1:], self.tokenizer)
            return {"reward_score": dense[0].tolist(), "reward_extra_info": {"tokencredit_score": float(score)}}

        @classmethod
        def assemble_rm_scores(cls, data, scores):
            # The colocated path (RewardLoopManager.compute_rm_score): each row already spans the padded width.
            return torch.tensor(scores, dtype=torch.float32)

    return DenseRewardManager


def _worker_class():
    from verl.experimental.agent_loop.agent_loop import AgentLoopWorker

    class DenseAgentLoopWorker(AgentLoopWorker):
        """verl's agent-loop worker, with a per-token `reward_score` from the reward loop written into `rm_scores`.

        Stock verl keeps one float per trajectory and scatters it at the last valid token; a list there would
        fail its pydantic model. The row travels in `extra_fields` instead, with its sum as the scalar.
        """

        async def _compute_score(self, outputs, kwargs):
            final = outputs[-1]
            final.extra_fields[_MASK_KEY] = list(final.response_mask)
            try:
                await super()._compute_score(outputs, kwargs)
            finally:
                final.extra_fields.pop(_MASK_KEY, None)
            if isinstance(final.reward_score, (list, tuple)):
                row = [float(v) for v in final.reward_score]
                final.extra_fields[_ROW_KEY] = row
                final.reward_score = math.fsum(row)

        def _postprocess(self, inputs, input_non_tensor_batch=None, validate=False):
            import torch

            rows = [inp.extra_fields.pop(_ROW_KEY, None) for inp in inputs]
            out = super()._postprocess(inputs, input_non_tensor_batch=input_non_tensor_batch, validate=validate)
            if all(row is None for row in rows):
                return out
            if any(row is None for row in rows):
                raise ValueError("tokencredit: some trajectories of the batch have dense rewards and some do not")
            rm_scores = torch.zeros_like(out.batch["responses"], dtype=torch.float32)
            for b, row in enumerate(rows):
                n = min(len(row), rm_scores.shape[1])
                rm_scores[b, :n] = torch.tensor(row[:n], dtype=torch.float32)
            out.batch["rm_scores"] = rm_scores
            return out

    _importable(DenseAgentLoopWorker)
    return DenseAgentLoopWorker


def _manager_class():
    import ray
    from verl.experimental.agent_loop.agent_loop import AgentLoopManager

    import tokencredit.adapters.verl as this

    class DenseAgentLoopManager(AgentLoopManager):
        """verl's agent-loop manager with `DenseAgentLoopWorker` workers (verl keeps a preset workers class)."""

        def __init__(self, *args, **kwargs):
            self.agent_loop_workers_class = ray.remote(this.DenseAgentLoopWorker)
            super().__init__(*args, **kwargs)

    _importable(DenseAgentLoopManager)
    return DenseAgentLoopManager


def _importable(cls) -> None:
    # Ray pickles actor classes by reference when `module.qualname` finds the same object: the worker process
    # then imports this module and rebuilds the class, instead of unpickling a copy of a closure.
    if __name__ == "tokencredit.adapters.verl":
        cls.__module__, cls.__qualname__ = __name__, cls.__name__


def _legacy_class():
    from verl.workers.reward_manager.abstract import AbstractRewardManager

    class LegacyDenseRewardManager(AbstractRewardManager):
        """Batch manager (`verl.workers.reward_manager`): returns the dense `reward_tensor` directly."""

        def __init__(self, tokenizer, num_examine=0, compute_score=None, reward_fn_key="data_source", **kwargs):
            self.tokenizer = tokenizer

        def __call__(self, data, return_dict: bool = False):
            tensor, scores = _dense(data, self.tokenizer)
            if return_dict:
                return {"reward_tensor": tensor, "reward_extra_info": {"tokencredit_score": scores}}
            return tensor

    return LegacyDenseRewardManager


# verl loads these by name (from this file, or by `module.Class` path): built then, so compute_score never imports verl.
__getattr__ = lazy_classes(__name__, globals(), {
    "DenseRewardManager": _classes, "DenseAgentLoopWorker": _worker_class, "DenseAgentLoopManager": _manager_class,
    "LegacyDenseRewardManager": _legacy_class,
})
