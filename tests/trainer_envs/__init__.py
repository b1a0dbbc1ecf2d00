"""Trainer test environments (no tests): `.venv-verl` and `.venv-openrlhf`, built by the Makefile from the
requirement files beside this one, and the harnesses that run in them (`*_harness.py`)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def trainer_python(venv: str) -> str:
    """The venv's interpreter, built (or found up to date) by `make <venv>/.installed` first.

    A venv that cannot be built (no package index, a broken pin) fails the test: these tests are the proof that
    the dense tiers reach the trainers' losses, and a skip would hide its absence.
    """
    started = time.monotonic()
    run = subprocess.run(["make", "-s", f"{venv}/.installed"], cwd=ROOT, capture_output=True, text=True, timeout=1500)
    if run.returncode != 0:
        pytest.fail(f"`make {venv}/.installed` failed ({run.returncode}):\n{(run.stdout + run.stderr)[-4000:]}")
    print(f"\n{venv}: ready in {time.monotonic() - started:.0f} s")
    return str(ROOT / venv / "bin" / "python")


def run_harness(python: str, harness: str, config: dict, work: Path, extra_pythonpath=(), timeout: float = 900) -> dict:
    """Run `tests/trainer_envs/<harness>` with `python` on `config`; its JSON report, or the test fails with its log."""
    work.mkdir(parents=True, exist_ok=True)
    cfg_path = work / f"{harness}.json"
    cfg_path.write_text(json.dumps({**config, "work_dir": str(work)}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TOKENCREDIT_", "PYTEST_", "VIRTUAL_ENV"))}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([*map(str, extra_pythonpath), str(ROOT), str(ROOT / "client")]))
    run = subprocess.run([python, str(HERE / harness), str(cfg_path)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=timeout)
    (work / f"{harness}.log").write_text(run.stderr)
    if run.returncode != 0:
        pytest.fail(f"{harness} exited with {run.returncode}:\n{run.stderr[-6000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])
