"""Compact PPO with GAE over per-token rewards (the inner loop of the bilevel run).

Why not TRL's PPOTrainer: in TRL 1.9 it lives in `trl.experimental`, wants a separate value *model* and a reward
*module*, and runs policy, reference and value as three full forward passes per minibatch. On 2 CPU cores that is
several times the budget. Here the policy, the reference and the value head share one frozen trunk pass per rollout
(`policy.SplitPolicy`), and the reward is an input: TokenCredit's per-token rewards, one per policy token.

Per token t of a response: r_t = dense_t − β·(log π(a_t) − log π_ref(a_t)); advantages by GAE(γ, λ), whitened;
clipped policy and value losses as in PPO (Schulman et al. 2017) and TRL's legacy PPOTrainer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

import torch

from .policy import SplitPolicy, Trunk


@dataclass
class PPOConfig:
    batch_size: int = 16  # prompts per PPO step
    response_tokens: int = 24  # every response has exactly this many tokens (EOS is suppressed)
    ppo_epochs: int = 2
    minibatch_size: int = 8
    lr: float = 5e-5
    kl_coef: float = 0.05  # β of the per-token KL penalty to the initial policy
    gamma: float = 1.0
    lam: float = 0.95
    clip_ratio: float = 0.2
    clip_value: float = 0.2
    vf_coef: float = 0.1
    max_grad_norm: float = 1.0
    # The policy is softmax(logits / temperature), in sampling and in every log-prob. At 1.0 a Q4 135M model
    # samples tokens with log-prob ≈ −10 in most responses, and PPO spends its budget on that tail.
    temperature: float = 0.7


@dataclass
class Rollout:
    prompts: List[str]
    response_ids: torch.Tensor  # (B, T)
    trunk: Trunk  # frozen-layer states of prompt + response
    prompt_len: int  # P: prompts are left-padded to P tokens
    old_logprobs: torch.Tensor  # (B, T)
    ref_logprobs: torch.Tensor  # (B, T)
    values: torch.Tensor  # (B, T)


def response_logprobs(logits: torch.Tensor, response_ids: torch.Tensor, prompt_len: int, banned: torch.Tensor,
                      temperature: float = 1.0):
    """log π(a_t | s_t) of each response token; logits at position P+t−1 predict token P+t."""
    T = response_ids.shape[1]
    step_logits = logits[:, prompt_len - 1 : prompt_len - 1 + T].float() / temperature
    # Generation never samples the banned (special) tokens, so they are outside the policy's support here too.
    step_logits = step_logits.index_fill(-1, banned, float("-inf"))
    return torch.log_softmax(step_logits, -1).gather(-1, response_ids.unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def rollout(policy: SplitPolicy, tokenizer, prompts: List[str], cfg: PPOConfig, banned: torch.Tensor) -> Rollout:
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    P = batch["input_ids"].shape[1]
    out = policy.lm.generate(
        **batch, do_sample=True, top_k=0, top_p=1.0, temperature=cfg.temperature,
        max_new_tokens=cfg.response_tokens, min_new_tokens=cfg.response_tokens,
        suppress_tokens=banned.tolist(), pad_token_id=tokenizer.pad_token_id,
    )
    response_ids = out[:, P:]
    mask = torch.cat([batch["attention_mask"], torch.ones_like(response_ids)], 1)
    trunk = policy.trunk(out, mask)
    logits, values = policy.head(trunk)
    ref_logits, _ = policy.head(trunk, reference=True)
    T = cfg.response_tokens
    return Rollout(
        prompts=list(prompts), response_ids=response_ids, trunk=trunk, prompt_len=P,
        old_logprobs=response_logprobs(logits, response_ids, P, banned, cfg.temperature),
        ref_logprobs=response_logprobs(ref_logits, response_ids, P, banned, cfg.temperature),
        values=values[:, P - 1 : P - 1 + T].float(),
    )


def gae(rewards: torch.Tensor, values: torch.Tensor, gamma: float, lam: float):
    """Advantages and returns for (B, T) rewards and values; the state after the last token is terminal."""
    advantages = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0])
    T = rewards.shape[1]
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    return advantages, advantages + values


def whiten(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean()) / (x.std() + 1e-8)


def ppo_step(policy: SplitPolicy, optimizers, ro: Rollout, token_rewards: torch.Tensor, cfg: PPOConfig,
             banned: torch.Tensor, generator: torch.Generator) -> Dict[str, float]:
    """One PPO update on a rollout whose environment rewards are `token_rewards` (B, T).

    `optimizers`: one optimizer or a list (e.g. Adam for the layers, SGD for the logit bias)."""
    optimizers = optimizers if isinstance(optimizers, (list, tuple)) else [optimizers]
    kl = ro.old_logprobs - ro.ref_logprobs
    rewards = token_rewards - cfg.kl_coef * kl
    advantages, returns = gae(rewards, ro.values, cfg.gamma, cfg.lam)
    advantages = whiten(advantages)
    B = token_rewards.shape[0]
    stats = {"pg_loss": 0.0, "vf_loss": 0.0, "clipfrac": 0.0, "approx_kl": 0.0}
    n_updates = 0
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(B, generator=generator)
        for start in range(0, B, cfg.minibatch_size):
            idx = order[start : start + cfg.minibatch_size]
            logits, values = policy.head(ro.trunk, rows=idx)
            logprobs = response_logprobs(logits, ro.response_ids[idx], ro.prompt_len, banned, cfg.temperature)
            values = values[:, ro.prompt_len - 1 : ro.prompt_len - 1 + cfg.response_tokens]
            ratio = torch.exp(logprobs - ro.old_logprobs[idx])
            adv = advantages[idx]
            pg_loss = torch.max(-adv * ratio, -adv * ratio.clamp(1 - cfg.clip_ratio, 1 + cfg.clip_ratio)).mean()
            old_v = ro.values[idx]
            v_clipped = old_v + (values - old_v).clamp(-cfg.clip_value, cfg.clip_value)
            vf_loss = 0.5 * torch.max((values - returns[idx]) ** 2, (v_clipped - returns[idx]) ** 2).mean()
            loss = pg_loss + cfg.vf_coef * vf_loss
            for opt in optimizers:
                opt.zero_grad()
            loss.backward()
            # Only the layers' gradient is clipped: the logit bias's is tiny per token and must not be scaled by them.
            torch.nn.utils.clip_grad_norm_(policy.layer_parameters(), cfg.max_grad_norm)
            for opt in optimizers:
                opt.step()
            with torch.no_grad():
                stats["pg_loss"] += pg_loss.item()
                stats["vf_loss"] += vf_loss.item()
                stats["clipfrac"] += ((ratio - 1).abs() > cfg.clip_ratio).float().mean().item()
                stats["approx_kl"] += (0.5 * (logprobs - ro.old_logprobs[idx]) ** 2).mean().item()
            n_updates += 1
    stats = {k: v / max(1, n_updates) for k, v in stats.items()}
    stats["kl_to_ref"] = kl.sum(1).mean().item()
    return stats
