"""`tokencredit-server` as a user runs it: explain, serve --help, demo-model --if-missing."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
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
    from workers.worker_main import _child_command

    args = build_parser().parse_args(["worker", "--model", str(tmp_path), "--broker", "redis://127.0.0.1:6379/0",
                                 "--explain-dtype", "float32", "--compile-rows", "off", "--torch-threads", "1"])
    settings = Settings(model=str(tmp_path), broker_url="redis://127.0.0.1:6379/0", explain_dtype="float32", compile_rows="off")
    cmd = _child_command(settings, args, 0)
    assert cmd[cmd.index("--explain-dtype") + 1] == "float32"
    assert cmd[cmd.index("--torch-threads") + 1] == "1"
    assert cmd[cmd.index("--compile-rows") + 1] == "off"
    child = build_parser().parse_args(cmd[3:])  # the child parses its own command line back
    assert child.compile_rows == "off" and child.explain_dtype == "float32"
