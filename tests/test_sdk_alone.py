"""The SDK is a light distribution (httpx, pydantic, numpy): its tests pass in a venv holding only `./client` and
pytest, where torch cannot be imported.

`make test` builds that venv (`.venv-sdk`, cached; `make sdk-venv`). This module runs the SDK's test files in it;
the servers they talk to run under this interpreter (`TC_TESTS_SERVER_PYTHON`), as a trainer's client talks to a
separate service. Tests there that need an optional extra (torch for `as_torch`, transformers for policy
tokenizers) skip, and must say so; they run in the main suite.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.support import ROOT

SDK_PYTHON = ROOT / ".venv-sdk" / "bin" / "python"
SDK_TESTS = ["tests/test_sdk.py", "tests/test_sdk_admin.py", "tests/test_alignment.py"]
# The only reasons a test may skip there: an optional extra that the SDK venv does not have.
OPTIONAL = ("torch", "transformers")


@pytest.fixture(scope="module")
def sdk_python():
    if not SDK_PYTHON.exists():
        pytest.skip(".venv-sdk is missing: `make sdk-venv` builds it (`make test` does)")
    return str(SDK_PYTHON)


def test_the_sdk_venv_has_the_sdk_and_no_torch(sdk_python, tmp_path):
    # Run outside the checkout, so that the folders `service/` and `workers/` are not importable by accident.
    code = ("import importlib.util as u, tokencredit, tokencredit.admin, tokencredit.adapters.openrlhf; "
            "print(tokencredit.__file__); print([m for m in ('torch', 'transformers', 'fastapi', 'service', 'workers') "
            "if u.find_spec(m)])")
    out = subprocess.run([sdk_python, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    where, present = out.stdout.splitlines()
    assert where.startswith(str(ROOT / "client")) and present == "[]"
    missing = subprocess.run([sdk_python, "-c", "import torch"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert missing.returncode != 0 and "No module named 'torch'" in missing.stderr


@pytest.mark.timeout(1000)
def test_sdk_tests_pass_without_torch(sdk_python, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "TOKENCREDIT_"))}
    env["TC_TESTS_SERVER_PYTHON"] = sys.executable
    cmd = [sdk_python, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "--basetemp", str(tmp_path / "t"), *SDK_TESTS]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    out = run.stdout + run.stderr
    summary = out.strip().splitlines()[-1]
    print(f"\nSDK venv: {summary}")
    assert run.returncode == 0, out[-6000:]
    assert re.search(r"\d+ passed", summary) and not re.search(r"failed|error", summary), out[-6000:]
    skipped = [line for line in out.splitlines() if line.startswith("SKIPPED")]
    unexpected = [line for line in skipped if not any(f"could not import '{m}'" in line for m in OPTIONAL)]
    assert not unexpected, "tests skipped in the SDK venv for another reason than a missing optional extra:\n" + "\n".join(unexpected)
