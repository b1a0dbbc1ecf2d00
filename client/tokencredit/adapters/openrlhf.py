"""OpenRLHF adapters. The dense tier is tested against OpenRLHF 0.11.2 (`tests/test_adapters_openrlhf.py` runs
its executor, samples generator and experience maker in `.venv-openrlhf`); `openrlhf` is imported only by the
dense tier.

Tier S, HTTP (no code): `--reward.remote_url http://HOST:PORT/openrlhf/get_reward`; the service answers
OpenRLHF's JSON exactly (`service/routes/compat.py`).

Tier S, file: `--reward.remote_url <this file>`. OpenRLHF loads it and calls `reward_func(queries, prompts,
labels)` from many threads at once (`asyncio.to_thread`); the one process-wide `Client` is thread-safe.

Tier D (dense), one line: start training with `python -m tokencredit.adapters.openrlhf <the usual
train_ppo_ray arguments>` instead of `python -m openrlhf.cli.train_ppo_ray`. The launcher adds
`--train.agent_func_path <this file>` (its `AgentExecutor` sets `reward` = `scores` = the RM score and adds
`token_rewards`, one per action token on the policy's own ids) and starts Ray with `install` as every worker's
setup hook. `install` patches OpenRLHF's samples generator (token rewards into the experience, at A-index
s + k − 1 for entry k of action span (s, e): the step tensors drop the first token) and experience maker: the
group baseline (`rloo`, `group_norm`, ...) and `reward.clip_range` act on the scalar as usual, and the zero-sum
shaping term `token_rewards − score at the last action` (divided by the group std under `group_norm`) is added
on top, so each sequence's return is unchanged and each token keeps its own credit.

The URL comes from `TOKENCREDIT_URL`; `TOKENCREDIT_ON_ERROR=skip` drops a prompt group whose sample could not be
scored (never a NaN or a 0); `TOKENCREDIT_DENSE_COEF` scales the shaping term (default 1).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from typing import Any, Dict, List, Optional, Sequence, Tuple

from tokencredit.adapters import lazy_classes
from tokencredit.client import Client

__all__ = ["reward_func", "place_token_rewards", "shaping_term", "dense_compute_reward", "response_of",
           "conversation_of", "install", "ray_runtime_env", "main", "AgentExecutor"]

logger = logging.getLogger(__name__)

_client: Optional[Client] = None
_client_lock = threading.Lock()
# Where the patched samples generator leaves the dense rewards: `Experience.info` is the only per-sample dict that
# OpenRLHF carries through `concat_experiences` (its tensors are right-padded like `action_mask`).
_DENSE_KEY = "tokencredit_dense"
_FAILED_ATTR = "_tokencredit_failed"


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


# ------------------------------------------------------------------------------------------------ chat prompts
_SENTINELS = ("\x01SYSTEM\x01", "\x01USER\x01", "\x01ASSISTANT\x01", "\x01USER2\x01")


def _render(tokenizer, messages, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)


def conversation_of(prompt: str, tokenizer) -> Optional[List[Dict[str, str]]]:
    """The conversation behind a prompt rendered with the policy's chat template (`--data.apply_chat_template`).

    Reads each role's wrapper off the same template rendered around sentinel texts, splits the prompt with them,
    and keeps the result only if rendering it again gives the prompt back exactly.

    Returns:
        OpenAI-style messages (the last one the user's), or None when the tokenizer has no chat template or the
        prompt is not such a rendering (plain-text data): the caller then sends the prompt as text.
    """
    if not getattr(tokenizer, "chat_template", None) or not prompt:
        return None
    try:
        s, u, a, u2 = _SENTINELS
        full = _render(tokenizer, [{"role": "system", "content": s}, {"role": "user", "content": u},
                                   {"role": "assistant", "content": a}, {"role": "user", "content": u2}], True)
        user_only = _render(tokenizer, [{"role": "user", "content": u}], False)
    except Exception:  # a template that rejects the probe (e.g. no system role): treat the prompt as text
        return None
    if any(x not in full for x in _SENTINELS) or u not in user_only:
        return None
    starts = {"system": full[: full.index(s)], "user": user_only[: user_only.index(u)]}
    between = {"system": full[full.index(s) + len(s): full.index(u)],       # system end + user start
               "user": full[full.index(u) + len(u): full.index(a)],         # user end + assistant start
               "assistant": full[full.index(a) + len(a): full.index(u2)]}   # assistant end + user start
    following = {"system": "user", "user": "assistant", "assistant": "user"}
    tail = full[full.index(u2) + len(u2):]                                  # user end + generation prompt
    if not tail or not prompt.endswith(tail):
        return None
    rest = prompt[: -len(tail)]
    for role in ("system", "user"):
        if starts[role] and rest.startswith(starts[role]):
            rest = rest[len(starts[role]):]
            break
    else:
        return None
    messages = []
    while True:
        sep = between[role]
        cut = rest.find(sep) if sep else -1
        if cut < 0:
            messages.append({"role": role, "content": rest})
            break
        messages.append({"role": role, "content": rest[:cut]})
        rest, role = rest[cut + len(sep):], following[role]
    if messages[-1]["role"] != "user":
        return None
    try:
        return messages if _render(tokenizer, messages, True) == prompt else None
    except Exception:
        return None


def _dense_item(prompt: str, prompt_ids: Sequence[int], action_ids: Sequence[int], tokenizer) -> Dict[str, Any]:
    """The item for one rollout: the conversation when the prompt is a chat rendering, else the prompt text."""
    messages = conversation_of(prompt, tokenizer)
    if messages is not None:
        text = tokenizer.decode(list(action_ids), skip_special_tokens=True)
        return {"messages": messages + [{"role": "assistant", "content": text}], "response_token_ids": list(action_ids)}
    return {"prompt": tokenizer.decode(list(prompt_ids), skip_special_tokens=True), "response_token_ids": list(action_ids)}


# ------------------------------------------------------------------------------------------------ layouts
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


def shaping_term(dense, action_mask):
    """The zero-sum shaping term: `dense` minus its row sum at the last action index (where OpenRLHF's
    `compute_reward` puts the scalar), 0 where `action_mask` is 0.

    Added to the stock per-token reward (the baselined, clipped scalar at the last action, minus KL), it moves each
    token's share of the score onto that token and leaves the sequence's return unchanged.
    """
    import torch

    mask = action_mask.to(dense.dtype)
    dense = dense * mask
    last = action_mask.size(1) - 1 - action_mask.long().fliplr().argmax(dim=1, keepdim=True)
    return dense - torch.zeros_like(dense).scatter_(1, last, dense.sum(dim=1, keepdim=True)) * mask


def dense_compute_reward(r, kl_coef: float, kl, action_mask, reward_clip_range=None, shaping=None):
    """OpenRLHF's `compute_reward` (the baselined scalar, clipped, at the last action, minus KL) plus `shaping`
    (`(B, A)`, e.g. `shaping_term(dense, action_mask)` scaled like the scalar). Needs openrlhf."""
    from openrlhf.models.utils import compute_reward

    reward = compute_reward(r, kl_coef, kl, action_mask=action_mask, reward_clip_range=reward_clip_range)
    if shaping is None:
        return reward
    return reward + shaping.to(reward.dtype) * action_mask.to(reward.dtype)


# ------------------------------------------------------------------------------------------------ the patch
_installed = False
_pending: Dict[int, Any] = {}


def install() -> None:
    """Patch OpenRLHF (0.11.2) in this process so the executor's `token_rewards` reach the experience's rewards.

    Idempotent. The launcher (`python -m tokencredit.adapters.openrlhf`) runs it in the driver and, as Ray's
    `worker_process_setup_hook`, in every worker process (OpenRLHF's trainer is a Ray actor).
    """
    global _installed
    if _installed:
        return
    import torch
    from openrlhf.trainer.ppo_utils import experience_maker
    from openrlhf.trainer.ppo_utils.samples_generator import SamplesGenerator

    stock_process = SamplesGenerator._process_response_into_experience
    stock_generate = SamplesGenerator._generate_vllm
    stock_advantages = experience_maker.RemoteExperienceMaker.compute_advantages_and_returns
    stock_compute_reward = experience_maker.compute_reward

    def process_response_into_experience(self, response, **generate_kwargs):
        experience = stock_process(self, response, **generate_kwargs)
        if "token_rewards" not in response:
            return experience  # another executor: stock behaviour
        width = experience.action_mask.size(1)
        if response["token_rewards"] is None:
            setattr(experience, _FAILED_ATTR, True)
            dense = torch.zeros(1, width)
        else:
            full = len(response["observation_tokens"]) - 1
            dense = place_token_rewards([response["token_rewards"]], [response["action_ranges"]], full)[:, :width]
        experience.info[_DENSE_KEY] = dense
        return experience

    def generate_vllm(self, dataloader_iter, num_prompts, dynamic_filtering, **generate_kwargs):
        experiences, consumed, exhausted = stock_generate(self, dataloader_iter, num_prompts, dynamic_filtering,
                                                          **generate_kwargs)
        # Each prompt's samples arrive together: a group with a failed sample goes whole (group baselines need
        # full groups), as dynamic filtering drops a group.
        n = generate_kwargs.get("n_samples_per_prompt", self.args.rollout.n_samples_per_prompt)
        kept, dropped = [], 0
        for g in range(0, len(experiences), n):
            group = experiences[g:g + n]
            if any(getattr(e, _FAILED_ATTR, False) for e in group):
                dropped += 1
            else:
                kept.extend(group)
        if dropped:
            logger.warning("tokencredit: dropped %d prompt group(s) with a sample the service could not score", dropped)
        return kept, consumed, exhausted

    def compute_advantages_and_returns(self, experiences):
        args = self.strategy.args
        coef = float(os.environ.get("TOKENCREDIT_DENSE_COEF", "1"))
        for experience in experiences:
            dense = experience.info.pop(_DENSE_KEY, None)
            if dense is not None:
                if dense.shape != experience.action_mask.shape:
                    raise ValueError(f"tokencredit: dense rewards {tuple(dense.shape)} vs action_mask "
                                     f"{tuple(experience.action_mask.shape)}")
                _pending[id(experience.action_mask)] = (experience, dense, coef, args.algo.advantage.estimator)
        try:
            return stock_advantages(self, experiences)
        finally:
            _pending.clear()

    def compute_reward(r, kl_coef, kl, action_mask=None, reward_clip_range=None):
        reward = stock_compute_reward(r, kl_coef, kl, action_mask=action_mask, reward_clip_range=reward_clip_range)
        entry = _pending.get(id(action_mask))
        if entry is None:
            return reward
        experience, dense, coef, estimator = entry
        scale = coef
        if estimator == "group_norm" and "group_reward_std" in experience.info:
            # The scalar was divided by its group's std (set just before, on the same rewards): so is the shaping.
            scale = coef / (experience.info["group_reward_std"].to(reward.dtype).unsqueeze(1) + 1e-9)
        return reward + scale * shaping_term(dense.to(reward.dtype), action_mask)

    SamplesGenerator._process_response_into_experience = process_response_into_experience
    SamplesGenerator._generate_vllm = generate_vllm
    experience_maker.RemoteExperienceMaker.compute_advantages_and_returns = compute_advantages_and_returns
    experience_maker.compute_reward = compute_reward
    _installed = True


def _agent_executor_class():
    from openrlhf.utils.agent import SingleTurnAgentExecutor

    class AgentExecutor(SingleTurnAgentExecutor):
        """The stock single-turn executor, scored by TokenCredit: `reward` = `scores` = the RM score, plus
        `token_rewards` (one per action token). OpenRLHF builds it with no arguments (`--train.agent_func_path`)."""

        def __init__(self, *args, **kwargs):
            super().__init__()  # no reward endpoint of OpenRLHF's: the score comes from the dense call

        async def execute(self, prompt, label, sampling_params, max_length, hf_tokenizer, llm_engine, images=None, **kw):
            import asyncio

            out = await super().execute(prompt, label, sampling_params, max_length, hf_tokenizer, llm_engine,
                                        images=images, **kw)
            tokens = list(out["observation_tokens"])
            action_ids = [t for s, e in out["action_ranges"] for t in tokens[s:e]]
            item = _dense_item(prompt, tokens[: out["action_ranges"][0][0]], action_ids, hf_tokenizer)
            [dense] = await asyncio.to_thread(_shared_client().dense_rewards, [item], tokenizer=hf_tokenizer)
            if dense is None:  # on_error="skip": the patched generator drops this sample's group
                out.update(reward=None, scores=None, token_rewards=None)
            else:
                out.update(reward=dense.score, scores=dense.score, token_rewards=list(dense.token_rewards),
                           extra_logs={"tokencredit_score": dense.score})
            return out

    return AgentExecutor


def ray_runtime_env() -> Dict[str, Any]:
    """The launcher's Ray runtime env: the env vars OpenRLHF's own `ray.init` sets (it skips its init when Ray is
    up) and the `TOKENCREDIT_*` ones, and `install` as every worker process's setup hook."""
    env = {"TOKENIZERS_PARALLELISM": os.environ.get("TOKENIZERS_PARALLELISM", "true"),
           "NCCL_DEBUG": os.environ.get("NCCL_DEBUG", "WARN"),
           "RAY_ENABLE_ZERO_COPY_TORCH_TENSORS": os.environ.get("RAY_ENABLE_ZERO_COPY_TORCH_TENSORS", "1")}
    env.update({k: v for k, v in os.environ.items() if k.startswith("TOKENCREDIT_")})
    return {"env_vars": env, "worker_process_setup_hook": "tokencredit.adapters.openrlhf.install"}


def main(argv: Optional[List[str]] = None) -> None:
    """`python -m tokencredit.adapters.openrlhf ARGS`: OpenRLHF's `train_ppo_ray` with the dense tier on."""
    import runpy

    import ray

    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(a.startswith("--train.agent_func_path") for a in argv):
        argv += ["--train.agent_func_path", os.path.abspath(__file__)]
    install()
    if not ray.is_initialized():
        ray.init(runtime_env=ray_runtime_env())
    sys.argv = ["openrlhf.cli.train_ppo_ray", *argv]
    runpy.run_module("openrlhf.cli.train_ppo_ray", run_name="__main__", alter_sys=True)


# OpenRLHF reads `AgentExecutor` with getattr on the loaded module: built then, so the scalar tier and the
# layout helpers never import openrlhf.
__getattr__ = lazy_classes(__name__, globals(), {"AgentExecutor": _agent_executor_class})

if __name__ == "__main__":
    main()
