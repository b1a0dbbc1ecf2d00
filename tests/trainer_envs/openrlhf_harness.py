"""Runs in `.venv-openrlhf` (OpenRLHF 0.11.2), driven by tests/test_adapters_openrlhf.py: OpenRLHF's own rollout
and experience code with the TokenCredit dense tier, against a live service. Prints one JSON report on stdout.

    PYTHONPATH=tests/trainer_envs/cuda_stubs:. python tests/trainer_envs/openrlhf_harness.py CONFIG.json

CONFIG: {"url", "work_dir", "runs": {name: {"argv": [train_ppo_ray flags], "prompts": [[message, ...], ...],
"responses": [[text per sample], ...]}}}.

What runs is OpenRLHF's: its CLI parses the flags (`train_ppo_ray`'s own parser and checks, stopped where
training would start), `_load_agent_executor` loads our `AgentExecutor` from the adapter file, `preprocess_data`
renders the chat prompts, `SamplesGenerator.generate_samples` (`_generate_vllm`, `_dispatch_prompts_to_vllm`,
`_process_response_into_experience`), `RolloutRayActor.generate_responses`, `SingleTurnAgentExecutor.execute`,
`RemoteExperienceMaker.make_experience_batch` (`make_experience`: KL from the actor's and reference's log-probs;
`compute_advantages_and_returns`: baselines, `compute_reward`, returns and advantages). Stand-ins: vLLM (fixed
token ids per prompt), the actor and reference model groups (fixed log-probs), and Ray (`ray.get`/`wait`/`put`
and `.remote` calls served in process).
"""

from __future__ import annotations

import asyncio
import json
import os
import runpy
import sys
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[2]
ADAPTER = ROOT / "client" / "tokencredit" / "adapters" / "openrlhf.py"
ACTOR_LOGPROB, REF_LOGPROB = -0.5, -0.7  # every action token: k1 KL = 0.2

# A ChatML template that, like real chat templates, reads content given as a list of text blocks (OpenRLHF's
# preprocess_data turns string contents into such lists).
TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for block in message['content'] %}{{ block['text'] }}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def policy_tokenizer(work: Path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from tests.tiny_models import _bytelevel_bpe_tokenizer

    out = work / "policy"
    if not (out / "tokenizer.json").exists():
        tok = PreTrainedTokenizerFast(tokenizer_object=_bytelevel_bpe_tokenizer(vocab_size=280),
                                      eos_token="<|endoftext|>", pad_token="<|endoftext|>")
        tok.chat_template = TEMPLATE
        tok.save_pretrained(out)
    return AutoTokenizer.from_pretrained(str(out)), out


def openrlhf_args(argv):
    """The args `train()` receives from OpenRLHF's own CLI for `argv` (parsed, checked), without training."""
    import ray

    import openrlhf.utils

    class Parsed(Exception):
        pass

    def stop(args):
        raise Parsed(args)

    saved = openrlhf.utils.get_strategy, ray.is_initialized, sys.argv
    openrlhf.utils.get_strategy, ray.is_initialized = stop, (lambda: True)  # train() starts Ray, then this
    sys.argv = ["train_ppo_ray", *argv]
    try:
        runpy.run_module("openrlhf.cli.train_ppo_ray", run_name="__main__")
    except Parsed as parsed:
        return parsed.args[0]
    finally:
        openrlhf.utils.get_strategy, ray.is_initialized, sys.argv = saved
    raise RuntimeError("train_ppo_ray returned without starting training")


class Ref:
    def __init__(self, value):
        self.value = value


class InProcessRay:
    """`ray.get`, `ray.wait` and `ray.put` over values computed in process (the `.remote` calls below)."""

    @staticmethod
    def get(refs):
        return [r.value for r in refs] if isinstance(refs, list) else refs.value

    @staticmethod
    def wait(refs, num_returns=1, timeout=None):
        return refs[:num_returns], refs[num_returns:]

    @staticmethod
    def put(value):
        return Ref(value)


def remote(fn):
    return SimpleNamespace(remote=lambda *a, **k: Ref(fn(*a, **k)))


class FakeVLLM:
    """The rollout actor's engine: each prompt's samples get that prompt's fixed responses, in turn."""

    def __init__(self, tokenizer, prompts, responses):
        self.tokenizer = tokenizer
        self.answers = [(p[-1]["content"], [tokenizer(r, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                                             for r in rs]) for p, rs in zip(prompts, responses)]
        self.served = {}

    async def generate(self, prompt_token_ids, sampling_params, multi_modal_data=None):
        text = self.tokenizer.decode(list(prompt_token_ids))
        [(key, options)] = [(k, o) for k, o in self.answers if k in text]
        k = self.served.get(key, 0)
        self.served[key] = k + 1
        ids = options[k % len(options)]
        return SimpleNamespace(outputs=[SimpleNamespace(token_ids=ids, finish_reason="stop", logprobs=None, text="")])


def rollout_engine(executor, vllm):
    """A rollout actor as the samples generator calls it: OpenRLHF's `RolloutRayActor.generate_responses`
    (unwrapped from Ray) with our executor and the stand-in engine."""
    from openrlhf.trainer.ray.vllm_engine import RolloutRayActor

    actor_cls = RolloutRayActor.__ray_metadata__.modified_class
    self = SimpleNamespace(executor=executor, generate=vllm.generate)
    return SimpleNamespace(
        get_num_unfinished_requests=remote(lambda: 0),
        generate_responses=remote(lambda **kw: asyncio.run(actor_cls.generate_responses(self, **kw))),
    )


class ModelGroup:
    """An actor / reference model group: `forward` gives fixed log-probs shaped like each micro-batch's actions."""

    def __init__(self, logprob):
        self.logprob = logprob

    def async_run_method_batch(self, method_name, **kwargs):
        import torch

        assert method_name == "forward"
        return [Ref([torch.full(m.shape, self.logprob) for m in kwargs["action_mask"]])]


def run(name, spec, tokenizer, executor) -> dict:
    from openrlhf.datasets.prompts_dataset import preprocess_data
    from openrlhf.trainer.ppo_utils import experience_maker, samples_generator
    from openrlhf.trainer.ppo_utils.experience_maker import RemoteExperienceMaker
    from openrlhf.trainer.ppo_utils.kl_controller import FixedKLController
    from openrlhf.trainer.ppo_utils.samples_generator import SamplesGenerator

    args = openrlhf_args(spec["argv"])
    strategy = SimpleNamespace(args=args, print=print)
    # OpenRLHF's dataset step for --data.apply_chat_template.
    prompts = [preprocess_data({"messages": p}, input_key="messages", apply_chat_template=tokenizer.apply_chat_template)[0]
               for p in spec["prompts"]]
    loader = [(None, prompts, [""] * len(prompts), [None] * len(prompts))]
    vllm = FakeVLLM(tokenizer, spec["prompts"], spec["responses"])
    samples_generator.ray = experience_maker.ray = InProcessRay
    generator = SamplesGenerator(strategy, loader, None, tokenizer, [rollout_engine(executor, vllm)])
    rollout, _, _, _ = generator.generate_samples(
        temperature=1.0, max_new_tokens=64, max_len=args.data.max_len,
        n_samples_per_prompt=args.rollout.n_samples_per_prompt)
    maker = RemoteExperienceMaker(ModelGroup(ACTOR_LOGPROB), None, None,
                                  ModelGroup(REF_LOGPROB) if args.algo.kl.init_coef > 0 else None,
                                  FixedKLController(args.algo.kl.init_coef), strategy, tokenizer)
    experiences = maker.make_experience_batch(rollout)
    samples = []
    for exp in experiences:
        for b in range(exp.sequences.size(0)):
            n = int(exp.attention_mask[b].sum())
            samples.append({
                "index": exp.index[b] if exp.index else None,
                "prompt": exp.prompts[b],
                "sequence": exp.sequences[b, :n].tolist(),
                "action_mask": exp.action_mask[b, : n - 1].long().tolist(),
                "returns": exp.returns[b, : n - 1].tolist(),
                "advantages": exp.advantages[b, : n - 1].tolist(),
                "reward": float(exp.rewards[b]),
                "score": float(exp.scores[b]),
                "info_keys": sorted(exp.info),
            })
    return {"estimator": args.algo.advantage.estimator, "n": args.rollout.n_samples_per_prompt,
            "kl_coef": args.algo.kl.init_coef, "clip_range": list(args.reward.clip_range),
            "agent_func_path": args.train.agent_func_path, "prompts": prompts, "samples": samples}


def ray_setup_hook() -> dict:
    """A real local Ray started with the launcher's runtime env: a fresh worker process has OpenRLHF patched."""
    import ray

    import tokencredit.adapters.openrlhf as adapter

    @ray.remote(num_cpus=0)
    def patched_names():
        from openrlhf.trainer.ppo_utils import experience_maker
        from openrlhf.trainer.ppo_utils.samples_generator import SamplesGenerator

        return [SamplesGenerator._generate_vllm.__qualname__, SamplesGenerator._process_response_into_experience.__qualname__,
                experience_maker.RemoteExperienceMaker.compute_advantages_and_returns.__qualname__,
                experience_maker.compute_reward.__qualname__, os.getpid()]

    ray.init(num_cpus=1, include_dashboard=False, runtime_env=adapter.ray_runtime_env(), log_to_driver=False)
    try:
        *names, pid = ray.get(patched_names.remote(), timeout=300)
    finally:
        ray.shutdown()
    return {"names": names, "other_process": pid != os.getpid()}


def main() -> None:
    cfg = json.loads(Path(sys.argv[1]).read_text())
    os.environ["TOKENCREDIT_URL"] = cfg["url"]
    os.environ["TOKENCREDIT_ON_ERROR"] = cfg.get("on_error", "raise")
    from importlib.metadata import version

    from openrlhf.trainer.ray.vllm_engine import _load_agent_executor

    import tokencredit.adapters.openrlhf as adapter

    tokenizer, policy_dir = policy_tokenizer(Path(cfg["work_dir"]))
    adapter.install()  # what the launcher's Ray setup hook does in each worker
    executor = _load_agent_executor(str(ADAPTER))  # as OpenRLHF's rollout actor loads --train.agent_func_path
    report = {"openrlhf": version("openrlhf"), "policy_dir": str(policy_dir), "executor": type(executor).__name__}
    for name, spec in cfg["runs"].items():
        report[name] = run(name, spec, tokenizer, executor)
    if cfg.get("ray"):
        report["ray_setup_hook"] = ray_setup_hook()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
