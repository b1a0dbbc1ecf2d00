"""Runs in `.venv-verl` (verl 0.9.1), driven by tests/test_adapters_verl.py: verl's own reward-consuming code with
the TokenCredit adapter, against a live service. Prints one JSON object (what verl's tensors hold) on stdout.

    python tests/trainer_envs/verl_harness.py CONFIG.json

CONFIG: {"url", "work_dir", "responses": [text, ...], "prompts": [[message, ...], ...]}.

What runs is verl's: the trainer's default config file, `load_class_from_fqn` on the documented
`agent_loop_manager_class`, `RewardLoopWorker` (which loads `DenseRewardManager` through `load_reward_manager` with
the kwargs verl passes), the agent-loop worker's `generate_sequences` (verl's single-turn agent loop, its
post-processing, its streaming `_compute_score`, `_postprocess`) and `extract_reward`. Stand-ins: the LLM server
(it returns fixed token ids; generation is not what is tested) and Ray (the reward-loop worker is called in
process instead of through an actor handle, with the same `compute_score.remote(data)` call).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ADAPTER = ROOT / "client" / "tokencredit" / "adapters" / "verl.py"


def policy_model_dir(work: Path) -> Path:
    """A tiny policy directory verl's HFModelConfig can read: a GPT-2 config and a ChatML tokenizer."""
    from transformers import GPT2Config, PreTrainedTokenizerFast

    from tests.tiny_models import CHATML_TEMPLATE, _bytelevel_bpe_tokenizer

    out = work / "policy"
    if (out / "config.json").exists():
        return out
    tok = PreTrainedTokenizerFast(tokenizer_object=_bytelevel_bpe_tokenizer(vocab_size=280), eos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>")
    tok.chat_template = CHATML_TEMPLATE
    tok.save_pretrained(out)
    GPT2Config(architectures=["GPT2LMHeadModel"], vocab_size=len(tok), n_layer=1, n_embd=16, n_head=2, n_positions=256, eos_token_id=tok.eos_token_id,
               bos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id).save_pretrained(out)
    return out


def verl_config(policy: Path, **overrides):
    """verl's own default PPO config with the user's command-line overrides, as main_ppo receives it."""
    import verl
    from omegaconf import OmegaConf

    base = OmegaConf.load(Path(verl.__file__).parent / "trainer" / "config" / "_generated_ppo_trainer.yaml")
    dotlist = [f"{k}={v}" for k, v in {
        "actor_rollout_ref.model.path": policy,
        "data.max_prompt_length": 192,
        "data.max_response_length": 32,
        "actor_rollout_ref.rollout.prompt_length": 192,
        "actor_rollout_ref.rollout.response_length": 32,
        "reward.num_workers": 1,
        "actor_rollout_ref.rollout.name": "vllm",  # the engine only names the LLM servers, stood in for here
        **overrides,
    }.items()]
    config = OmegaConf.merge(base, OmegaConf.from_dotlist(dotlist))
    from verl.experimental.reward_loop import migrate_legacy_reward_impl

    return migrate_legacy_reward_impl(config)


class FakeLLM:
    """The LLM server client: answers each prompt with its fixed response's token ids (the agent loops run
    concurrently, so the response is found by the prompt's last message, not by arrival order)."""

    def __init__(self, tokenizer, prompts, responses):
        self.tokenizer = tokenizer
        self.answers = [(p[-1]["content"], tokenizer(r, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
                        for p, r in zip(prompts, responses)]

    async def generate(self, request_id, *, prompt_ids, sampling_params, **kwargs):
        from verl.workers.rollout.replica import TokenOutput

        text = self.tokenizer.decode(list(prompt_ids))
        [ids] = [ids for needle, ids in self.answers if needle in text]
        return TokenOutput(token_ids=ids, stop_reason="completed")


class InProcessHandle:
    """A reward-loop worker handle: `compute_score.remote(data)` awaited, as verl's agent loop does with Ray."""

    def __init__(self, worker):
        self.compute_score = type("Method", (), {"remote": staticmethod(worker.compute_score)})


def prompts_batch(prompts):
    import numpy as np
    from verl import DataProto

    n = len(prompts)
    raw = np.empty(n, dtype=object)
    raw[:] = [list(p) for p in prompts]
    return DataProto.from_dict(non_tensors={
        "raw_prompt": raw,
        "data_source": np.array(["tokencredit"] * n, dtype=object),
        "reward_model": np.array([{"ground_truth": ""}] * n, dtype=object),
        "extra_info": np.array([{"index": i} for i in range(n)], dtype=object),
        "index": np.arange(n),
    })


def dense_agent_loop(cfg, policy: Path) -> dict:
    from verl.experimental.agent_loop.agent_loop import AgentLoopManager
    from verl.utils.import_utils import load_class_from_fqn

    config = verl_config(policy, **{
        "actor_rollout_ref.rollout.agent.agent_loop_manager_class": "tokencredit.adapters.verl.DenseAgentLoopManager",
        "reward.reward_manager.source": "importlib",
        "reward.reward_manager.module.path": ADAPTER,
        "reward.reward_manager.name": "DenseRewardManager",
    })
    # What RayPPOTrainer does with the key (verl/trainer/ppo/ray_trainer.py).
    manager_cls = load_class_from_fqn(config.actor_rollout_ref.rollout.agent.agent_loop_manager_class, "AgentLoopManager")
    assert issubclass(manager_cls, AgentLoopManager)
    return asyncio.run(_dense_agent_loop(cfg, config, manager_cls))


async def _dense_agent_loop(cfg, config, manager_cls) -> dict:
    # Built inside the running loop, as in their Ray actors: verl's reward managers keep the loop they start in.
    from verl.experimental.reward_loop.reward_loop import RewardLoopWorker
    from verl.trainer.ppo.reward import extract_reward

    import tokencredit.adapters.verl as adapter

    reward_worker = RewardLoopWorker(config, reward_router_address=None)
    manager = manager_cls(config, llm_client=None, teacher_client=None,
                          reward_loop_worker_handles=[InProcessHandle(reward_worker)])
    # The workers class verl would start as Ray actors: ours, wrapped by ray.remote.
    worker_cls = manager.agent_loop_workers_class.__ray_metadata__.modified_class
    assert issubclass(worker_cls, adapter.DenseAgentLoopWorker), worker_cls
    # Ray ships the actor class to its worker processes with cloudpickle: by reference (module + name), so a
    # worker rebuilds it by importing the adapter.
    from ray import cloudpickle

    blob = cloudpickle.dumps(adapter.DenseAgentLoopWorker)
    by_reference = b"tokencredit.adapters.verl" in blob and len(blob) < 200

    worker = adapter.DenseAgentLoopWorker(config, None, None, [InProcessHandle(reward_worker)])
    worker.llm_client = FakeLLM(worker.tokenizer, cfg["prompts"], cfg["responses"])
    out = await worker.generate_sequences(prompts_batch(cfg["prompts"]))
    reward_tensor, extra = extract_reward(out)  # what the trainer reads as token_level_scores
    return {
        "manager": type(reward_worker.reward_manager).__name__,
        "worker_pickled_by_reference": by_reference,
        "responses": out.batch["responses"].tolist(),
        "response_mask": out.batch["response_mask"].tolist(),
        "rm_scores": reward_tensor.tolist(),
        "tokencredit_score": [float(v) for v in extra["tokencredit_score"]],
    }


def scalar_compute_score(cfg, policy: Path) -> dict:
    """Tier S on the same path: verl's stock agent-loop worker and NaiveRewardManager calling `compute_score`."""
    config = verl_config(policy, **{
        "reward.custom_reward_function.path": ADAPTER,
        "reward.custom_reward_function.name": "compute_score",
    })
    return asyncio.run(_scalar_compute_score(cfg, config))


async def _scalar_compute_score(cfg, config) -> dict:
    from verl.experimental.agent_loop.agent_loop import AgentLoopWorker
    from verl.experimental.reward_loop.reward_loop import RewardLoopWorker
    from verl.trainer.ppo.reward import extract_reward

    reward_worker = RewardLoopWorker(config, reward_router_address=None)
    worker = AgentLoopWorker(config, None, None, [InProcessHandle(reward_worker)])  # verl's stock worker
    worker.llm_client = FakeLLM(worker.tokenizer, cfg["prompts"], cfg["responses"])
    out = await worker.generate_sequences(prompts_batch(cfg["prompts"]))
    reward_tensor, _ = extract_reward(out)
    return {"manager": type(reward_worker.reward_manager).__name__, "rm_scores": reward_tensor.tolist(),
            "response_mask": out.batch["response_mask"].tolist()}


def legacy_sync(cfg, policy: Path) -> dict:
    """`compute_score_sync` under verl's legacy batch NaiveRewardManager (verl.workers.reward_manager), on a
    left-padded prompt / right-padded response batch as the legacy trainer builds it."""
    import numpy as np
    import torch
    from transformers import AutoTokenizer
    from verl import DataProto
    from verl.workers.reward_manager.naive import NaiveRewardManager

    import tokencredit.adapters.verl as adapter

    tok = AutoTokenizer.from_pretrained(str(policy))
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in cfg["plain_prompts"]]
    responses = [tok(r, add_special_tokens=False)["input_ids"] for r in cfg["responses"]]
    P, R = max(map(len, prompts)), max(map(len, responses)) + 2
    pad = tok.pad_token_id
    prompt_t = torch.tensor([[pad] * (P - len(p)) + p for p in prompts])
    resp_t = torch.tensor([r + [pad] * (R - len(r)) for r in responses])
    attn = torch.tensor([[0] * (P - len(p)) + [1] * len(p) + [1] * len(r) + [0] * (R - len(r))
                         for p, r in zip(prompts, responses)])
    n = len(prompts)
    data = DataProto.from_dict(
        tensors={"prompts": prompt_t, "responses": resp_t, "attention_mask": attn,
                 "input_ids": torch.cat([prompt_t, resp_t], 1)},
        non_tensors={"data_source": np.array(["tokencredit"] * n, dtype=object),
                     "reward_model": np.array([{"ground_truth": ""}] * n, dtype=object),
                     "extra_info": np.array([{"prompt": p} for p in cfg["plain_prompts"]], dtype=object)})
    manager = NaiveRewardManager(tok, num_examine=0, compute_score=adapter.compute_score_sync)
    result = manager(data, return_dict=True)
    legacy_dense = adapter.LegacyDenseRewardManager(tok)(data, return_dict=True)
    return {"reward_tensor": result["reward_tensor"].tolist(), "valid": [len(r) for r in responses],
            "response_ids": responses, "dense_tensor": legacy_dense["reward_tensor"].tolist()}


def main() -> None:
    cfg = json.loads(Path(sys.argv[1]).read_text())
    os.environ["TOKENCREDIT_URL"] = cfg["url"]
    work = Path(cfg["work_dir"])
    policy = policy_model_dir(work)
    import verl

    report = {"verl": verl.__version__, "policy_dir": str(policy)}
    for name in cfg.get("parts", ["dense_agent_loop", "scalar_compute_score", "legacy_sync"]):
        report[name] = globals()[name](cfg, policy)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
