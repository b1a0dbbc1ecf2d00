"""TRL adapters, tested with TRL 0.27.2 (the lowest supported: async reward functions arrived in 0.27) and 1.16.0
(`tests/test_adapters_trl.py`, run by `make test` in `.venv-trl-min` and `.venv`). `trl` is imported only when a
trainer class is first used.

Tier S, GRPO and RLOO (`reward_funcs`):
    `reward_funcs=[make_reward_func("http://127.0.0.1:8000")]`: an async function returning the RM score of each
    completion. Conversational data is sent as `messages` (roles, text content blocks, tool calls and tool results
    kept; the server renders them with the RM's chat template), standard data as `prompt`/`response`.

Tier D, GRPO only: `DenseGRPOTrainer(..., tokencredit=Client(URL))`.
    One service call per completion, started in a background thread as soon as the completions are generated, so
    the explanation overlaps TRL's old- and reference-log-prob passes. Its `score` is the outcome reward (the
    trainer's own `tokencredit` reward function: no second RM pass, and Σ dense = outcome exactly); its per-token
    rewards, on the policy's own completion ids, become a group-relative shaping advantage added to GRPO's:
    `advantages = A_outcome + λ · z_group(reward-to-go)`. Tool results (`tool_mask == 0`) get no reward and no
    shaping; the RM scores the final assistant turn given the whole conversation. In eval only the score is asked
    for (one RM forward per completion, no explanation).

RLOO is sequence-level in TRL (it sums log-probs per sequence), so it has no dense tier. TRL ≥ 1.1x has no
PPOTrainer: the dense PPO tier is OpenRLHF's and verl's (docs/trainers/).
"""

from __future__ import annotations

import json
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from tokencredit.adapters import lazy_classes
from tokencredit.client import AsyncClient, Client

__all__ = ["make_reward_func", "chat_messages", "reward_item", "dense_items", "shaping_advantages", "DenseGRPOTrainer"]

_ROLES = ("system", "user", "assistant", "tool")


def _content(content: Any) -> Union[None, str, List[dict]]:
    """A message's content as the service takes it: a string, text blocks, or None. Blocks other than text (images,
    audio) are dropped: the RM reads text."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, dict):
        content = [content]
    blocks = [{"type": "text", "text": str(b.get("text", ""))} for b in content if isinstance(b, dict) and b.get("type") == "text"]
    return blocks


def _tool_call(call: Dict[str, Any]) -> Dict[str, Any]:
    function = call.get("function", call)
    arguments = function.get("arguments", "")
    # TRL's response parser gives arguments as a dict; the wire (OpenAI) shape is a JSON string.
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    out = {"type": "function", "function": {"name": str(function.get("name", "")), "arguments": arguments}}
    if isinstance(call.get("id"), str):
        out["id"] = call["id"]
    return out


def chat_messages(messages: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """TRL conversational messages in the service's `messages` shape (`ChatMessage`).

    Kept: the role, string or text-block content, an assistant's tool calls (arguments as a JSON string), a tool
    message's `name` and `tool_call_id`. Dropped: non-text content blocks and any other key (e.g. TRL's parsed
    `reasoning_content`), which the service's strict schema refuses.

    Example:
        >>> chat_messages([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}])
        [{'role': 'user', 'content': [{'type': 'text', 'text': 'Hi'}]}]
    """
    out = []
    for m in messages:
        role = m.get("role")
        if role not in _ROLES:
            raise ValueError(f"message role {role!r} is not one of {_ROLES}")
        n: Dict[str, Any] = {"role": role}
        content = _content(m.get("content"))
        calls = [_tool_call(c) for c in (m.get("tool_calls") or [])] if role == "assistant" else []
        if calls:
            n["tool_calls"] = calls
        # Null content is allowed only beside tool calls; elsewhere an empty text stands for it.
        n["content"] = content if content is not None or calls else ""
        if role == "tool":
            for key in ("name", "tool_call_id"):
                if isinstance(m.get(key), str):
                    n[key] = m[key]
        out.append(n)
    return out


def _is_chat(value: Any) -> bool:
    return isinstance(value, list) and (not value or isinstance(value[0], dict))


def reward_item(prompt: Any, completion: Any, response_text: Optional[str] = None) -> Optional[Dict[str, Any]]:
    """The service item for one TRL (prompt, completion), or None when nothing can be scored (an empty answer,
    or a conversation that ends on a tool call).

    Args:
        prompt: TRL's prompt: a string, or a list of messages.
        completion: TRL's completion: a string, or a list of messages (the last one is the answer).
        response_text: The answer's text as decoded from the policy's ids, used instead of the completion's
            own last message (the tier-D trainer sends ids, whose decoding must equal the response).
    """
    if _is_chat(prompt) or _is_chat(completion):
        history = (list(prompt) if _is_chat(prompt) else [{"role": "user", "content": str(prompt)}])
        turns = list(completion) if _is_chat(completion) else [{"role": "assistant", "content": str(completion)}]
        last = turns[-1] if turns else None
        if last is None or last.get("role") != "assistant" or last.get("tool_calls"):
            return None  # the answer is a tool call (the rollout stopped before its result): nothing to score
        if response_text is None:
            content = _content(last.get("content"))
            response_text = content if isinstance(content, str) else "".join(b["text"] for b in content or [])
        # The turns before the answer (tool calls and their results) are part of the conversation the RM reads.
        history += turns[:-1]
        if not response_text.strip():
            return None
        return {"messages": chat_messages(history) + [{"role": "assistant", "content": response_text}]}
    response = str(completion) if response_text is None else response_text
    if not response.strip():
        return None
    return {"prompt": str(prompt), "response": response}


def make_reward_func(client: Union[str, AsyncClient], *, name: str = "tokencredit", **call_kwargs):
    """An async TRL reward function returning the RM score of each completion (tier S; TRL ≥ 0.27).

    Args:
        client: An `AsyncClient` or the service URL (a client is then created, with its defaults).
        name: The function's `__name__`, which TRL uses for its `rewards/<name>` metrics.
        **call_kwargs: Passed to `AsyncClient.scores` (e.g. `on_error="skip"`, `deadline_ms=60000`).

    Returns:
        `async def reward_func(prompts, completions, completion_ids=None, **kwargs) -> list[float | None]`; None
        for a completion with nothing to score (empty, or ending on a tool call) and, under `on_error="skip"`, for
        a failed one: TRL turns None into NaN and gives that completion no advantage.

    Example:
        >>> reward = make_reward_func("http://127.0.0.1:8000", on_error="skip")
        >>> reward.__name__
        'tokencredit'
    """
    tc = AsyncClient(client) if isinstance(client, str) else client

    async def reward_func(prompts, completions, completion_ids=None, **kwargs) -> List[Optional[float]]:
        # Texts, not ids: the scalar does not depend on the policy's tokenization (TRL runs this function on its
        # own background event loop; the AsyncClient opens one connection pool per loop).
        items = [reward_item(p, c) for p, c in zip(prompts, completions)]
        sendable = [k for k, item in enumerate(items) if item is not None]
        scores = await tc.scores([items[k] for k in sendable], **call_kwargs) if sendable else []
        out: List[Optional[float]] = [None] * len(items)
        for k, s in zip(sendable, scores):
            out[k] = s
        return out

    reward_func.__name__ = reward_func.__qualname__ = name
    return reward_func


def shaping_advantages(token_rewards, mask, group_size: int, eps: float = 1e-6):
    """Group-relative per-token shaping advantage: reward-to-go, z-scored within each prompt's group.

    Args:
        token_rewards (`torch.Tensor` of shape `(B, T)`): dense reward at completion token k (0 where none).
        mask (`torch.Tensor` of shape `(B, T)`): 1 on the tokens that carry rewards and train (completion tokens the
            policy generated; 0 on padding, tool results and completions without dense rewards).
        group_size: completions per prompt (GRPO's `num_generations`); rows `[g·G, (g+1)·G)` are one group.
        eps: added to the std, so a group of constant returns gives zeros rather than NaN.

    Returns:
        `(B, T)` float tensor, zero-mean and unit-std over each group's valid tokens, 0 where `mask == 0`. The
        baseline is per prompt (as GRPO's own), so a prompt whose completions all score high gets no positive
        shaping on every token, and no rank's batch scale leaks into another's.
    """
    import torch

    b, t = token_rewards.shape
    if b % group_size:
        raise ValueError(f"{b} completions do not form whole groups of {group_size}")
    m = mask.to(torch.float32)
    r = token_rewards.to(torch.float32) * m
    rtg = torch.flip(torch.cumsum(torch.flip(r, dims=[1]), dim=1), dims=[1]) * m  # Σ_{j ≥ k} r_j
    g, gm = rtg.reshape(b // group_size, -1), m.reshape(b // group_size, -1)
    n = gm.sum(dim=1, keepdim=True).clamp(min=1.0)
    mean = g.sum(dim=1, keepdim=True) / n
    std = (((g - mean) * gm) ** 2).sum(dim=1, keepdim=True).div(n).sqrt()
    return ((g - mean) / (std + eps) * gm).reshape(b, t)


def _segments(mask_row: Sequence[int]) -> List[Tuple[int, int]]:
    """[start, end) runs of 1s."""
    runs, start = [], None
    for k, v in enumerate(list(mask_row) + [0]):
        if v and start is None:
            start = k
        elif not v and start is not None:
            runs.append((start, k))
            start = None
    return runs


def dense_items(prompts, completions, completion_ids, tool_mask, decode) -> Tuple[List[Optional[dict]], List[int]]:
    """One dense item per completion (None: nothing to score) and the column where its rewards start.

    The response is the policy's last generated segment (the run of `tool_mask == 1` after the last tool result,
    or the whole completion without tools): its ids are sent as `response_token_ids`, so reward k lands on
    column start + k of TRL's completion tensors (no shift: GRPO's log-prob k is that of completion token k).
    """
    items, starts = [], []
    for i, ids in enumerate(completion_ids):
        ids = list(ids)
        start, end = 0, len(ids)
        if tool_mask is not None:
            runs = _segments(list(tool_mask[i])[: len(ids)])
            start, end = runs[-1] if runs else (0, 0)
        answer = ids[start:end]
        item = reward_item(prompts[i], completions[i], response_text=decode(answer)) if answer else None
        if item is not None:
            item["response_token_ids"] = answer
        items.append(item)
        starts.append(start)
    return items, starts


def _dense_grpo_trainer_class():
    import concurrent.futures
    import copy

    import torch
    import trl
    from trl import GRPOTrainer

    from tokencredit.results import step_tensor
    from tokencredit.tokens import decoder_for

    class DenseGRPOTrainer(GRPOTrainer):
        """`GRPOTrainer` whose outcome reward and per-token shaping come from one TokenCredit call per completion.

        Args:
            model, reward_funcs, *args, **kwargs: `GRPOTrainer`'s own. `reward_funcs` is optional: the trainer puts
                its own `tokencredit` reward function (the dense call's score) first; any you give are added after
                it (and `args.reward_weights`, when set, must list the `tokencredit` weight first).
            tokencredit (`Client`): the client of the service.
            dense_coef (`float`, defaults to 0.1): λ, the weight of the shaping advantage.
            dense_weights (`dict`, *optional*): shaping weights of the dense call (else the client's or server's).
            dense_methods (`dict`, *optional*): per-explainer budgets of the dense call.
            aggregate (`dict`, *optional*): e.g. `{"steps": {"separator": "\\n\\n"}}`: shape with step rewards
                (each step's reward on its last token, PRM-style) instead of token rewards.
        """

        def __init__(self, model, reward_funcs=None, *args, tokencredit: Client, dense_coef: float = 0.1,
                     dense_weights=None, dense_methods=None, aggregate=None, **kwargs):
            trainer_args = kwargs.get("args", args[0] if args else None)
            if getattr(trainer_args, "use_liger_kernel", False):
                raise ValueError("DenseGRPOTrainer needs (B, T) advantages, which the Liger GRPO loss does not take; "
                                 "set use_liger_kernel=False")
            if getattr(trainer_args, "loss_type", None) == "sapo" and trl.__version__.startswith("0."):
                raise ValueError(f"loss_type='sapo' takes (B,) advantages only in TRL {trl.__version__}; use another loss")
            self.tokencredit, self.dense_coef = tokencredit, float(dense_coef)
            self.dense_weights, self.dense_methods, self.aggregate = dense_weights, dense_methods, aggregate
            self._dense_pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokencredit-dense")
            self._dense_future = None
            self._dense_answer = None
            self._tc_tokenizer = None
            extra = [reward_funcs] if reward_funcs is not None and not isinstance(reward_funcs, list) else list(reward_funcs or [])
            super().__init__(model, [self._outcome_reward_func()] + extra, *args, **kwargs)

        # -- the call, started as soon as the completions exist ------------------------------------------------
        def _generate(self, prompts):
            out = super()._generate(prompts)
            # Every TRL from 0.27 to 1.16 returns (prompt_ids, completion_ids, tool_mask, completions, ...).
            _, completion_ids, tool_mask, completions = out[:4]
            training = self.model.training
            if self._tc_tokenizer is None:
                # The call's thread decodes with its own copy: a Rust tokenizer that the training thread re-pads or
                # re-truncates meanwhile raises "Already borrowed".
                tok = self.processing_class
                self._tc_tokenizer = copy.deepcopy(getattr(tok, "tokenizer", tok))  # processors wrap the tokenizer
            self._dense_future = self._dense_pool.submit(self._call_service, prompts, completions, completion_ids,
                                                         tool_mask, training)
            return out

        def _call_service(self, prompts, completions, completion_ids, tool_mask, training):
            tok = self._tc_tokenizer
            items, starts = dense_items(prompts, completions, completion_ids, tool_mask, decoder_for(tok))
            sendable = [k for k, item in enumerate(items) if item is not None]
            results: List[Any] = [None] * len(items)
            if sendable:
                if training:
                    got = self.tokencredit.dense_rewards([items[k] for k in sendable], tokenizer=tok,
                                                         weights=self.dense_weights, methods=self.dense_methods,
                                                         aggregate=self.aggregate)
                else:  # eval needs only the score: one RM forward, no explanation
                    plain = [{k: v for k, v in items[i].items() if k != "response_token_ids"} for i in sendable]
                    got = self.tokencredit.scores(plain)
                for k, r in zip(sendable, got):
                    results[k] = r
            return results, starts, training

        def _outcome_reward_func(self):
            trainer = self

            def tokencredit(prompts, completions, completion_ids=None, **kwargs):
                waited = time.perf_counter()
                future, trainer._dense_future = trainer._dense_future, None
                if future is None:
                    raise RuntimeError("DenseGRPOTrainer: no service call in flight for these completions")
                results, starts, training = future.result()
                trainer._dense_answer = (results, starts) if training else None
                mode = "train" if training else "eval"
                trainer._metrics[mode]["tokencredit/wait_s"].append(time.perf_counter() - waited)
                if not training:
                    return list(results)
                return [None if r is None else r.score for r in results]

            return tokencredit

        # -- the shaping term -----------------------------------------------------------------------------------
        def _generate_and_score_completions(self, inputs):
            output = super()._generate_and_score_completions(inputs)
            answer, self._dense_answer = self._dense_answer, None
            if answer is None:  # eval: the outcome advantage only
                return output
            results, starts = answer
            ids, mask = output["completion_ids"], output["completion_mask"]
            if ids.shape[0] % self.num_generations:
                raise ValueError(
                    f"DenseGRPOTrainer: this process holds {ids.shape[0]} completions, not whole groups of "
                    f"num_generations={self.num_generations}; make per_device_train_batch_size × steps_per_generation "
                    "a multiple of num_generations (the shaping baseline is per prompt group)"
                )
            if "tool_mask" in output:
                mask = mask * output["tool_mask"]
            b, width = ids.shape
            dense = torch.zeros((b, width), dtype=torch.float32)
            has = torch.zeros((b, 1), dtype=torch.float32)
            for i, r in enumerate(results):
                if r is None:
                    continue
                row = step_tensor([r], length=len(r.token_rewards))[0] if self.aggregate else torch.tensor(r.token_rewards)
                end = min(starts[i] + len(row), width)
                dense[i, starts[i]:end] = row[: end - starts[i]]
                has[i] = 1.0
            dense = dense.to(mask.device) * mask
            shaping = shaping_advantages(dense, mask * has.to(mask.device), self.num_generations)
            advantages = output["advantages"]
            if advantages.dim() == 1:
                advantages = advantages.unsqueeze(1)
            output["advantages"] = advantages + self.dense_coef * shaping.to(advantages.device)
            # Kept beside the advantages (split and shuffled with them; the loss never reads it) for inspection.
            output["token_rewards"] = dense
            done = [r for r in results if r is not None]
            metrics = self._metrics["train"]
            metrics["tokencredit/dense_items"].append(float(len(done)))
            metrics["tokencredit/dense_skipped"].append(float(b - len(done)))
            if done:
                metrics["tokencredit/coverage"].append(sum(r.coverage for r in done) / len(done))
                metrics["tokencredit/prompt_truncated"].append(float(sum(r.prompt_truncated for r in done)))
            return output

    return DenseGRPOTrainer


# Built on first access so that importing this module never imports trl (or torch).
__getattr__ = lazy_classes(__name__, globals(), {"DenseGRPOTrainer": _dense_grpo_trainer_class})
