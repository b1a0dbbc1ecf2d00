"""TRL adapters (written against TRL v1.9.0; `trl` is imported only when a trainer class is first used).

Tier S, any TRL with `reward_funcs` (GRPO, RLOO; TRL ≥ 0.14):
    `reward_funcs=[make_reward_func("http://127.0.0.1:8000")]` — an async function returning the RM score per
    completion (`None` for a failed item under `on_error="skip"`, which TRL turns into NaN and excludes).

Tier D, hybrid for group estimators (GRPO/RLOO), TRL v1.9:
    `DenseGRPOTrainer(..., tokencredit=Client(...), dense_coef=0.1)`. GRPO normalises one scalar per completion
    over its group, so per-token rewards would be summed away; the trainer keeps that outcome advantage and adds
    λ · a per-token shaping advantage (the reward-to-go of TokenCredit's rewards on the policy's own completion
    ids, standardised over the batch's valid tokens). `GRPOTrainer._compute_loss` accepts (B, T) advantages.

Tier D for PPO-style training (per-token rewards added before the KL term, as ABC's PPO subclass does):
    `ppo_token_rewards(...)`; TRL's experimental `PPOTrainer` has no reward hook (see docs/trainers/trl.md for the
    one line to change in a copy of its `train()`).
"""

from __future__ import annotations

from typing import Any, List, Optional, Union

from tokencredit.adapters import lazy_classes
from tokencredit.client import AsyncClient, Client

__all__ = ["make_reward_func", "shaping_advantages", "ppo_token_rewards", "DenseGRPOTrainer", "text_of"]


def text_of(value: Any) -> str:
    """Plain text of a TRL prompt or completion: a string, or conversational messages (contents joined)."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return str(value.get("content", ""))
    return "\n".join(text_of(m) for m in value)


def make_reward_func(client: Union[str, AsyncClient], *, name: str = "tokencredit", **call_kwargs):
    """An async TRL reward function returning the RM score of each completion (tier S).

    Args:
        client: An `AsyncClient` or the service URL (a client is then created, with its defaults).
        name: The function's `__name__`, which TRL uses for its `rewards/<name>` metrics.
        **call_kwargs: Passed to `AsyncClient.scores` (e.g. `on_error="skip"`, `deadline_ms=60000`).

    Returns:
        `async def reward_func(prompts, completions, completion_ids=None, **kwargs) -> list[float | None]`.

    Example:
        >>> reward = make_reward_func("http://127.0.0.1:8000", on_error="skip")
        >>> reward.__name__
        'tokencredit'
    """
    tc = AsyncClient(client) if isinstance(client, str) else client

    async def reward_func(prompts, completions, completion_ids=None, **kwargs) -> List[Optional[float]]:
        # Texts, not ids: the scalar does not depend on the policy's tokenization (TRL runs this function on its
        # own background event loop; the AsyncClient opens one connection pool per loop).
        items = [{"prompt": text_of(p), "response": text_of(c)} for p, c in zip(prompts, completions)]
        return await tc.scores(items, **call_kwargs)

    reward_func.__name__ = reward_func.__qualname__ = name
    return reward_func


def shaping_advantages(token_rewards, mask, eps: float = 1e-6):
    """Per-token shaping advantage from dense rewards: reward-to-go, standardised over the valid tokens.

    Args:
        token_rewards (`torch.Tensor` of shape `(B, T)`): TokenCredit's rewards at completion token k (0 on padding).
        mask (`torch.Tensor` of shape `(B, T)`): 1 on valid completion tokens.
        eps: Added to the std, so a batch of constant returns gives zeros rather than NaN.

    Returns:
        `(B, T)` float tensor, zero-mean and unit-std over valid tokens, 0 where `mask == 0`.
    """
    import torch

    m = mask.to(torch.float32)
    r = token_rewards.to(torch.float32) * m
    rtg = torch.flip(torch.cumsum(torch.flip(r, dims=[1]), dim=1), dims=[1])  # Σ_{j ≥ k} r_j
    n = m.sum().clamp(min=1.0)
    mean = (rtg * m).sum() / n
    std = (((rtg - mean) * m) ** 2).sum().div(n).sqrt()
    return (rtg - mean) / (std + eps) * m


def ppo_token_rewards(dense, kl, kl_coef: float, padding_mask):
    """PPO rewards with dense per-token rewards added before the KL term (ABC's `compute_rewards`).

    Args:
        dense (`(B, R)` tensor): reward k on response token k (Σ over a row = the RM score).
        kl (`(B, R)` tensor): the per-token KL estimate TRL computes (`-logr` or the k3 estimator).
        kl_coef: TRL's `args.kl_coef`.
        padding_mask (`(B, R)` bool tensor): True on padding (TRL's `padding_mask`).

    Returns:
        `(B, R)` rewards `-kl_coef · kl + dense`, with padding zeroed; replaces TRL's `rewards[i, actual_end] += score`.
    """
    keep = (~padding_mask).to(dense.dtype)
    return (-kl_coef * kl + dense) * keep


def _dense_grpo_trainer_class():
    from trl import GRPOTrainer

    class DenseGRPOTrainer(GRPOTrainer):
        """`GRPOTrainer` whose advantages are the group-normalised outcome advantage plus λ · per-token shaping.

        Args:
            tokencredit (`Client`): the TokenCredit client used for the dense rewards.
            dense_coef (`float`, defaults to 0.1): λ, the weight of the shaping advantage.
            dense_weights (`dict`, *optional*): shaping weights for the dense call (else the server's).
            *args, **kwargs: `GRPOTrainer`'s own arguments; keep a TokenCredit (or any) reward function in
                `reward_funcs` for the outcome part.
        """

        def __init__(self, *args, tokencredit: Client, dense_coef: float = 0.1, dense_weights=None, **kwargs):
            super().__init__(*args, **kwargs)
            self.tokencredit, self.dense_coef, self.dense_weights = tokencredit, float(dense_coef), dense_weights

        def _generate_and_score_completions(self, inputs):
            import torch

            from tokencredit.results import as_torch

            output = super()._generate_and_score_completions(inputs)
            ids, mask = output["completion_ids"], output["completion_mask"]
            tok = self.processing_class
            tok = getattr(tok, "tokenizer", tok)  # processors wrap the tokenizer
            items, rows = [], []
            for i in range(ids.shape[0]):
                valid = ids[i][mask[i].bool()].tolist()
                prompt_ids = output["prompt_ids"][i][output["prompt_mask"][i].bool()].tolist()
                if not valid or not tok.decode(valid, skip_special_tokens=True).strip():
                    continue  # nothing to redistribute: no shaping for an empty completion (counted below)
                items.append({"prompt": tok.decode(prompt_ids, skip_special_tokens=True), "response_token_ids": valid})
                rows.append(i)
            dense = torch.zeros(ids.shape, dtype=torch.float32)
            if items:
                results = self.tokencredit.dense_rewards(items, tokenizer=tok, weights=self.dense_weights)
                filled = as_torch(results, length=ids.shape[1], missing=0.0)
                for k, i in enumerate(rows):
                    if results[k] is not None:
                        dense[i] = filled[k]
            mode = "train" if self.model.training else "eval"
            self._metrics[mode]["tokencredit/dense_items"].append(float(len(items)))
            self._metrics[mode]["tokencredit/dense_skipped"].append(float(ids.shape[0] - len(items)))
            shaping = shaping_advantages(dense, mask.cpu()).to(output["advantages"].device)
            advantages = output["advantages"]
            if advantages.dim() == 1:
                advantages = advantages.unsqueeze(1)
            output["advantages"] = advantages + self.dense_coef * shaping
            return output

    return DenseGRPOTrainer


# Built on first access so that importing this module never imports trl (or torch).
__getattr__ = lazy_classes(__name__, globals(), {"DenseGRPOTrainer": _dense_grpo_trainer_class})

