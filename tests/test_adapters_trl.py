"""TRL: one real GRPO training step (tiny GPT-2 policy on CPU) against the live TokenCredit service, with the
scalar reward function and the dense hybrid trainer; and the shaping math on a hand-made layout."""

from __future__ import annotations

import math
import sys

import pytest

from tests.test_sdk_support import CHEAP, live_server
from tokencredit import Client, Retry
from tokencredit.adapters import trl as trl_adapter


@pytest.fixture(scope="module")
def url(encoder_rm_dir, tmp_path_factory):
    return live_server(encoder_rm_dir, tmp_path_factory.mktemp("trl"))


def test_module_does_not_import_trl():
    import subprocess

    code = "import sys, tokencredit.adapters.trl, tokencredit.adapters.openrlhf, tokencredit.adapters.verl; " \
           "print(any(m in sys.modules for m in ('trl', 'openrlhf', 'verl', 'torch')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr


def test_shaping_advantages_layout():
    import torch

    dense = torch.tensor([[1.0, 2.0, 3.0, 0.0], [0.5, 0.5, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    adv = trl_adapter.shaping_advantages(dense, mask)
    assert adv.shape == (2, 4) and torch.all(adv[mask == 0] == 0)
    valid = adv[mask == 1]
    assert abs(float(valid.mean())) < 1e-5 and abs(float(valid.std(unbiased=False)) - 1) < 1e-3
    assert float(adv[0, 0]) > float(adv[0, 1]) > float(adv[0, 2])  # reward-to-go decreases along a positive row
    kl = torch.ones(2, 4)
    r = trl_adapter.ppo_token_rewards(dense, kl, 0.1, mask == 0)
    assert torch.allclose(r[0, :3], dense[0, :3] - 0.1) and r[0, 3] == 0


def _policy(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from tests.tiny_models import build_policy_tokenizer

    tok = PreTrainedTokenizerFast.from_pretrained(str(build_policy_tokenizer(tmp_path / "tok")))
    tok.pad_token = tok.eos_token
    import torch

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tok), n_layer=2, n_embd=32, n_head=4, n_positions=128,
                        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    return GPT2LMHeadModel(config), tok


def test_real_grpo_step(url, tmp_path):
    from datasets import Dataset
    from trl import GRPOConfig

    model, tok = _policy(tmp_path)
    dataset = Dataset.from_dict({"prompt": ["The movie was", "I loved the", "What a waste of", "The acting"]})
    args = GRPOConfig(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=2, max_completion_length=8,
        max_steps=1, use_cpu=True, report_to="none", logging_steps=1, save_strategy="no", bf16=False,
        temperature=1.0, disable_tqdm=True,
    )
    reward = trl_adapter.make_reward_func(url, on_error="skip")
    dense_client = Client(url, weights=CHEAP, on_error="skip", retry=Retry(attempts=2, base_delay=0.01))
    trainer = trl_adapter.DenseGRPOTrainer(model=model, reward_funcs=[reward], args=args, train_dataset=dataset,
                                           processing_class=tok, tokencredit=dense_client, dense_coef=0.1)
    seen = {}
    original = trainer._generate_and_score_completions

    def spy(inputs):
        out = original(inputs)
        seen["advantages"] = out["advantages"]
        seen["mask"] = out["completion_mask"]
        return out

    trainer._generate_and_score_completions = spy
    result = trainer.train()
    assert trainer.state.global_step == 1 and math.isfinite(result.training_loss)
    adv = seen["advantages"]
    assert adv.dim() == 2 and adv.shape == seen["mask"].shape  # (B, T): outcome + λ · per-token shaping
    logged = {k for entry in trainer.state.log_history for k in entry}
    assert "rewards/tokencredit/mean" in logged, logged
    dense_items = [e["tokencredit/dense_items"] for e in trainer.state.log_history if "tokencredit/dense_items" in e]
    assert dense_items and dense_items[0] > 0, "no completion got dense rewards"
    assert bool((adv * seen["mask"]).std() > 0)
    dense_client.close()
