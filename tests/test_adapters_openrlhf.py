"""OpenRLHF 0.11.2's own rollout and experience code with the TokenCredit dense tier, against a live service: the
per-token rewards inside OpenRLHF's experiences are the service's `token_rewards` placed at A-index s + k − 1
(OpenRLHF's step tensors drop the first token), with the group baseline and clipping on the scalar and KL on top.

The harness (`tests/trainer_envs/openrlhf_harness.py`) runs in `.venv-openrlhf` (the real OpenRLHF wheel; `make`
builds it, and a venv that cannot be built fails these tests), with stand-ins only for vLLM, the model groups
and Ray (see its docstring); a real local Ray checks the launcher's worker setup hook. OpenRLHF computes the
per-token reward inside `compute_advantages_and_returns` and keeps its returns: with gamma = 1 (REINFORCE-style
estimators) reward t = returns[t] − returns[t + 1].
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.support import CHEAP, running_server
from tests.trainer_envs import HERE, run_harness, trainer_python
from tokencredit import Client

# The first test may build the trainer venv (minutes on a busy machine; `make test` builds it before pytest).
pytestmark = pytest.mark.timeout(1800)

ADAPTER = str(Path(__file__).resolve().parents[1] / "client" / "tokencredit" / "adapters" / "openrlhf.py")
PROMPTS = [
    [{"role": "user", "content": "Tell me about the movie."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "How was your weekend?"}],
    [{"role": "user", "content": "Describe the weather."}],
]
RESPONSES = [
    [" The movie was wonderful and the acting was superb.", " This film was terrible, boring and far too long."],
    [" It was amazing, I had a great time with friends!", " It was awful, everything went wrong."],
    # The second is longer than the service's max_response_tokens: under on_error="skip" its group is dropped.
    [" The weather is a constant reminder of the beautiful world around us.",
     " The weather is a constant reminder of the beautiful world around us." * 4],
]
MAX_RESPONSE_TOKENS = 48
KL = -0.5 - -0.7  # the harness's actor and reference log-probs: k1 KL per action token


@pytest.fixture(scope="module")
def service(llama_chat_rm_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("openrlhf-service") / "server.log"
    with running_server(llama_chat_rm_dir, log, weights=json.dumps(CHEAP), max_response_tokens=MAX_RESPONSE_TOKENS) as url:
        yield url


@pytest.fixture(scope="module")
def report(service, tmp_path_factory):
    python = trainer_python(".venv-openrlhf")
    common = ["--train.agent_func_path", ADAPTER, "--data.apply_chat_template"]
    runs = {
        "group_norm": {"argv": common + ["--algo.advantage.estimator", "group_norm", "--rollout.n_samples_per_prompt", "2"],
                       "prompts": PROMPTS, "responses": RESPONSES},
        "reinforce": {"argv": common + ["--algo.advantage.estimator", "reinforce", "--algo.kl.init_coef", "0",
                                        "--reward.clip_range", "-1", "1"],
                      "prompts": PROMPTS[:2], "responses": [r[:1] for r in RESPONSES[:2]]},
    }
    config = {"url": service, "on_error": "skip", "runs": runs, "ray": True}
    return run_harness(python, "openrlhf_harness.py", config,
                       tmp_path_factory.mktemp("openrlhf"), extra_pythonpath=[HERE / "cuda_stubs"])


@pytest.fixture(scope="module")
def policy(report):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(report["policy_dir"])


def _conversation(prompt_text):
    [messages] = [p for p in PROMPTS if p[-1]["content"] in prompt_text]
    return messages


def _expected(url, policy, samples):
    """Per sample: the service's answer for the conversation and the policy's action ids, and the action span."""
    items, spans = [], []
    for s in samples:
        mask = s["action_mask"]
        start = mask.index(1) + 1  # A-index j is sequence position j + 1
        end = len(mask) - mask[::-1].index(1) + 1
        assert all(mask[start - 1: end - 1])  # one action span (single turn)
        ids = s["sequence"][start:end]
        text = policy.decode(ids, skip_special_tokens=True)
        items.append({"messages": _conversation(s["prompt"]) + [{"role": "assistant", "content": text}],
                      "response_token_ids": ids})
        spans.append((start, end))
    with Client(url) as tc:
        return list(zip(tc.dense_rewards(items, tokenizer=policy), spans))


def _rewards(sample):
    """OpenRLHF's per-token reward from its returns (gamma = 1): r_t = G_t − G_{t+1}."""
    g = sample["returns"] + [0.0]
    return [g[t] - g[t + 1] for t in range(len(sample["returns"]))]


def test_executor_and_flags(report):
    assert report["openrlhf"] == "0.11.2" and report["executor"] == "AgentExecutor"
    for run in ("group_norm", "reinforce"):
        assert report[run]["agent_func_path"] == ADAPTER
    assert report["group_norm"]["estimator"] == "group_norm" and report["group_norm"]["n"] == 2


def test_launcher_patches_every_ray_worker(report):
    # `python -m tokencredit.adapters.openrlhf` starts Ray with `install` as the worker setup hook (OpenRLHF's
    # trainer, which runs the samples generator and experience maker, is a Ray actor): a real local Ray here.
    hook = report["ray_setup_hook"]
    assert hook["other_process"]
    assert hook["names"] == ["install.<locals>.generate_vllm", "install.<locals>.process_response_into_experience",
                             "install.<locals>.compute_advantages_and_returns", "install.<locals>.compute_reward"]


def test_chat_prompts_are_sent_as_messages(report, policy):
    from tokencredit.adapters.openrlhf import conversation_of

    for prompt_text, messages in zip(report["group_norm"]["prompts"], PROMPTS):
        assert conversation_of(prompt_text, policy) == messages  # OpenRLHF's rendering, read back exactly
    assert conversation_of("Tell me about the movie.", policy) is None  # plain text stays text


def test_reinforce_per_token_rewards_are_the_token_rewards(service, report, policy):
    run = report["reinforce"]
    lo, hi = run["clip_range"]
    expected = _expected(service, policy, run["samples"])
    assert len(expected) == 2
    for sample, (want, (start, end)) in zip(run["samples"], expected):
        r = _rewards(sample)
        assert sample["reward"] == pytest.approx(want.score, abs=1e-6)  # the executor's scalar: the RM score
        placed = r[start - 1: end - 1]  # token k of the span (s, e) at A-index s + k − 1
        clipped = min(max(want.score, lo), hi)
        assert want.score < lo  # the tiny RM scores below -1: clipping is exercised
        assert placed[:-1] == pytest.approx(want.token_rewards[:-1], abs=1e-5)
        # The scalar is clipped as OpenRLHF clips it; the shaping term (token rewards minus the score) rides on top.
        assert placed[-1] == pytest.approx(clipped + want.token_rewards[-1] - want.score, abs=1e-5)
        assert all(v == 0 for v in r[: start - 1] + r[end - 1:])
        assert sum(r) == pytest.approx(clipped, abs=1e-5)
        assert len(set(round(v, 6) for v in placed)) > 2  # per-token values, not one scalar at the end


def test_group_norm_baseline_on_the_scalar_plus_scaled_shaping(service, report, policy):
    run = report["group_norm"]
    samples = run["samples"]
    # The third prompt's group had a sample the service could not score (too long): dropped whole, no NaN.
    assert sorted(_conversation(s["prompt"])[-1]["content"] for s in samples) == sorted(
        [PROMPTS[0][-1]["content"]] * 2 + [PROMPTS[1][-1]["content"]] * 2)
    assert all(math.isfinite(v) for s in samples for v in s["returns"] + s["advantages"])
    expected = _expected(service, policy, samples)
    groups = {}
    for sample, (want, span) in zip(samples, expected):
        groups.setdefault(sample["prompt"], []).append((sample, want, span))
    for members in groups.values():
        scores = [w.score for _, w, _ in members]
        mean = sum(scores) / 2
        std = math.sqrt(sum((s - mean) ** 2 for s in scores) / (2 - 1))  # torch.std: unbiased
        for sample, want, (start, end) in members:
            z = (want.score - mean) / (std + 1e-9)
            r = _rewards(sample)
            placed = [v + run["kl_coef"] * KL for v in r[start - 1: end - 1]]  # KL penalty on every action token
            shaping = [v / (std + 1e-9) for v in want.token_rewards]
            assert placed[:-1] == pytest.approx(shaping[:-1], rel=1e-4, abs=1e-5)
            assert placed[-1] == pytest.approx(z + shaping[-1] - want.score / (std + 1e-9), rel=1e-4, abs=1e-5)
            # The return is the group-normalised score (less KL): the baseline is untouched by the dense part.
            assert sum(placed) == pytest.approx(z, rel=1e-4, abs=1e-5)
    assert all("tokencredit_dense" not in s["info_keys"] for s in samples)
