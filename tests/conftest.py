"""Shared fixtures: tiny random reward models built from configs, saved and re-loaded with from_pretrained."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Shaping versions are durable (SQLite in the user's cache by default): tests and the servers they spawn get
# their own file, so no test reads or leaves a version in ~/.cache/tokencredit.
import tempfile  # noqa: E402

# Compiled rows cost ~10 s of inductor compile per server start on the tiny RMs; the suite's servers run eager
# rows, and tests/test_levers.py tests compiled rows (and their fallback) directly.
os.environ.setdefault("TOKENCREDIT_COMPILE_ROWS", "off")
os.environ["TOKENCREDIT_STATE_DB"] = os.path.join(tempfile.mkdtemp(prefix="tokencredit-tests-"), "shaping.sqlite3")
# Credit heads likewise (the servers' background trainer saves the versions it learns from full-budget requests).
os.environ["TOKENCREDIT_CREDIT_DIR"] = tempfile.mkdtemp(prefix="tokencredit-tests-credit-")

import importlib.util  # noqa: E402
import subprocess  # noqa: E402

import pytest  # noqa: E402

from tests import tiny_models  # noqa: E402
from tests.support import ROOT, SERVER_PYTHON, server_env  # noqa: E402


def _built(builder: str, out):
    """`tiny_models.<builder>(out)`, here or, where this interpreter has no torch (the SDK's own venv), by the
    server's interpreter: the servers under test load the model there anyway."""
    if importlib.util.find_spec("torch") is not None:
        return getattr(tiny_models, builder)(out)
    code = f"from tests.tiny_models import {builder}; {builder}({str(out)!r})"
    subprocess.run([SERVER_PYTHON, "-c", code], cwd=ROOT, env=server_env(), check=True)
    return out


@pytest.fixture(scope="session")
def encoder_rm_dir(tmp_path_factory):
    """A 2-label BERT RM (WordPiece) saved to disk."""
    return _built("build_encoder_rm", tmp_path_factory.mktemp("encoder-rm"))


@pytest.fixture(scope="session")
def causal_rm_dir(tmp_path_factory):
    """A 1-logit GPT-2 RM (byte-level BPE) saved to disk."""
    return tiny_models.build_causal_rm(tmp_path_factory.mktemp("causal-rm"))


@pytest.fixture(scope="session")
def llama_chat_rm_dir(tmp_path_factory):
    """A 1-logit Llama RM whose tokenizer has a ChatML chat template (SmolLM2's layout) saved to disk."""
    return tiny_models.build_llama_chat_rm(tmp_path_factory.mktemp("llama-chat-rm"))


@pytest.fixture(scope="session")
def encoder_rm(encoder_rm_dir):
    from workers.evaluator import set_torch_threads
    from workers.model import RewardModel

    set_torch_threads(1)
    # fp32 rows: exactness tests compare against the models own fp32 forward; bf16 has its own tests.
    return RewardModel.load(encoder_rm_dir, explain_dtype="float32")


@pytest.fixture(scope="session")
def causal_rm(causal_rm_dir):
    from workers.model import RewardModel

    return RewardModel.load(causal_rm_dir, explain_dtype="float32")


@pytest.fixture(scope="session")
def bpe_policy_tokenizer_dir(tmp_path_factory):
    """A byte-level BPE policy tokenizer directory (different from either RM's tokenizer)."""
    return tiny_models.build_policy_tokenizer(tmp_path_factory.mktemp("policy-tok"))


@pytest.fixture(scope="session")
def llama_chat_rm(llama_chat_rm_dir):
    from workers.model import RewardModel

    return RewardModel.load(llama_chat_rm_dir, explain_dtype="float32")
