"""`tokencredit-server` as a user runs it: explain, serve --help, demo-model --if-missing."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
ENV.pop("NO_COLOR", None)  # colour must be off because stdout is a pipe, not because of NO_COLOR


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "service.cli", *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def test_explain_prints_each_token_and_conserves(encoder_rm_dir, encoder_rm):
    response = "The movie was wonderful and the acting was superb."
    out = _cli("explain", "--model", str(encoder_rm_dir), "--prompt", "How was the film?", "--response", response,
               "--weights", '{"shap": 1.0}')
    assert out.returncode == 0, out.stderr[-3000:]
    assert "\x1b" not in out.stdout, "ANSI codes on a non-TTY stdout"
    lines = out.stdout.strip().splitlines()
    n_tokens = encoder_rm.count_response_tokens(response)
    assert lines[0].startswith("score ") and len(lines) == n_tokens + 2, out.stdout
    rewards = [float(line.rsplit(None, 1)[-1]) for line in lines[1:-1]]
    total, score = map(float, re.fullmatch(r"sum (\S+) = score (\S+)", lines[-1]).groups())
    assert math.isclose(total, score, abs_tol=2e-6)  # both printed with 6 decimals
    assert math.isclose(sum(rewards), score, abs_tol=n_tokens * 5e-6 + 1e-6)  # each printed with 5 decimals


def test_serve_help_lists_bind_flags():
    out = _cli("serve", "--help", timeout=60)
    assert out.returncode == 0, out.stderr
    assert "--host" in out.stdout and "--port" in out.stdout and "127.0.0.1" in out.stdout


def test_demo_model_if_missing_skips_existing(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "tokencredit_demo.json").write_text("{}")
    script = Path(sys.executable).with_name("tokencredit-server")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "service.cli"]
    out = subprocess.run([*cmd, "demo-model", "--if-missing", "--out", str(tmp_path)], cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "already built" in out.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "tokencredit_demo.json"]


def test_worker_children_get_every_model_flag(tmp_path):
    from service.cli import build_parser
    from service.config import Settings
    from service.worker_main import _child_command

    args = build_parser().parse_args(["worker", "--model", str(tmp_path), "--broker", "redis://127.0.0.1:6379/0",
                                 "--explain-dtype", "float32", "--compile-rows", "off", "--torch-threads", "1"])
    settings = Settings(model=str(tmp_path), broker_url="redis://127.0.0.1:6379/0", explain_dtype="float32", compile_rows="off")
    cmd = _child_command(settings, args, 0)
    assert cmd[cmd.index("--explain-dtype") + 1] == "float32"
    assert cmd[cmd.index("--torch-threads") + 1] == "1"
    assert cmd[cmd.index("--compile-rows") + 1] == "off"
    child = build_parser().parse_args(cmd[3:])  # the child parses its own command line back
    assert child.compile_rows == "off" and child.explain_dtype == "float32"


def test_explain_json_on_policy_tokens(encoder_rm_dir, bpe_policy_tokenizer_dir):
    from transformers import AutoTokenizer

    response = "The movie was wonderful, my friend!"
    out = _cli("explain", "--model", str(encoder_rm_dir), "--prompt", "How was it?", "--response", response,
               "--weights", '{"shap": 0.7, "sparse": 0.3}', "--policy-tokenizer", str(bpe_policy_tokenizer_dir), "--json")
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)  # stdout is the JSON alone; the waiting lines went to stderr
    policy = AutoTokenizer.from_pretrained(str(bpe_policy_tokenizer_dir))
    ids = policy(response, add_special_tokens=False)["input_ids"]
    assert result["tokens_of"] == "policy" and len(result["token_rewards"]) == len(result["tokens"]) == len(ids)
    assert "".join(result["tokens"]) == response  # byte-level BPE tokens cover the response exactly
    assert math.isclose(math.fsum(result["token_rewards"]), result["score"], abs_tol=1e-9)
    for name in ("sparse", "shap"):  # what the trainer gets, and why: each component and its attributions
        assert math.isclose(math.fsum(result["components"][name]), result["score"], abs_tol=1e-9)
    shap = result["attributions"]["shap"]
    assert math.isclose(math.fsum(shap["values"]) + shap["base"], result["score"], abs_tol=1e-9)
    assert "loading the reward model" in out.stderr and "explaining" in out.stderr


def test_explain_bad_input_is_one_line(encoder_rm_dir, tmp_path):
    base = ["explain", "--model", str(encoder_rm_dir), "--prompt", "Hi."]
    cases = [
        ([*base, "--response", "Fine.", "--weights", '{"shap": 0.5'], "--weights is not JSON"),
        ([*base, "--response", "Fine.", "--weights", '{"shap": 0.5}'], "--weights: weights must lie on the simplex"),
        ([*base, "--response", "Fine.", "--weights", '{"shapp": 1}'], "--weights: shapp: Extra inputs are not permitted"),
        ([*base, "--response", "   "], "--response: response must contain at least one non-whitespace character"),
        ([*base, "--response", "word " * 400], "--response is too long: 800 RM tokens exceed the limit of 252"),
        ([*base, "--response", "Fine.", "--policy-tokenizer", str(tmp_path / "none")], "--policy-tokenizer: "),
        (["explain", "--model", str(tmp_path), "--prompt", "Hi.", "--response", "Fine."], "cannot load a reward model from"),
    ]
    for args, message in cases:
        out = _cli(*args)
        errors = [line for line in out.stderr.splitlines() if line.startswith("tokencredit-server explain:")]
        assert out.returncode == 2 and "Traceback" not in out.stderr, (args, out.stderr[-2000:])
        assert len(errors) == 1 and message in errors[0], (message, out.stderr[-2000:])
        assert out.stdout == ""


def test_serve_says_what_it_waits_for(encoder_rm_dir, tmp_path):
    from tests.support import spawn_server, stop, wait_ready

    proc, url = spawn_server(encoder_rm_dir, tmp_path / "serve.log", state_db=tmp_path / "s.sqlite3")
    try:
        wait_ready(proc, url, tmp_path / "serve.log")
        deadline = time.monotonic() + 10
        while "ready after" not in (log := (tmp_path / "serve.log").read_text()):
            assert time.monotonic() < deadline, log
            time.sleep(0.1)
    finally:
        stop(proc)
    assert "waiting for the reward model to load; /readyz answers 503 until then" in log
    assert re.search(rf"ready after \d+ s: open {re.escape(url)}/ui in a browser", log), log


def test_serve_without_model_says_it_builds_the_demo_rm_first(tmp_path):
    env = dict(ENV, TOKENCREDIT_CACHE_DIR=str(tmp_path))  # an empty cache: the demo RM is not built there
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", "1"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stderr.readline()  # said before the build starts; the build is not waited for
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert first.startswith(f"no --model: building the demo sentiment RM into {tmp_path}") and "~5 min" in first, first
