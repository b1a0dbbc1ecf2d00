"""The schema against the server: schemathesis (CLI, every check, every phase) on live servers over loopback.

Two servers on the tiny encoder RM: one with both tokens set (the data plane asks for TOKENCREDIT_API_TOKEN, the
admin API for its own) and one with none (the data plane open, the admin API disabled). Generation is
deterministic (the same cases every run), so a failure reproduces; positive cases that break a rule no JSON Schema
can state are dropped by tests/schema_fuzz_hooks.py, each rule checked there on its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path

import pytest

from tests.support import spawn_server, stop, wait_ready

pytest.importorskip("schemathesis")

ROOT = Path(__file__).resolve().parents[1]
API_TOKEN = "tc-api-" + uuid.uuid4().hex
ADMIN_TOKEN = "tc-admin-" + uuid.uuid4().hex
# Small limits, so that boundary cases (max items, max characters) are cheap to explain.
LIMITS = {"max_items": 4, "max_response_tokens": 48, "max_total_tokens": 120, "max_response_chars": 400}
# Cases per operation and phase: 13 operations, two servers; >= 1,000 cases in all (asserted below).
MAX_EXAMPLES = 40
# Positive cases of each body route that the hooks keep (measured: 27 dense, 32 OpenRLHF, 23 classify).
MIN_KEPT = 10

# 412: a conditional PUT whose ETag is stale is well formed (RFC 9110); the weights' version is server state.
# 413: a body over a limit the schema states (maxItems, maxLength) is refused with the limit named.
# 428: a PUT without the required If-Match header is answered "precondition required" (RFC 6585), naming it.
CONFIG = """
[checks.positive_data_acceptance]
expected-statuses = ["2xx", "401", "403", "404", "409", "412", "429"]

[checks.negative_data_rejection]
expected-statuses = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428"]

[checks.missing_required_header]
expected-statuses = ["400", "401", "403", "406", "415", "422", "428"]
"""
AUTH = """
[auth.openapi.APIToken]
bearer = "{api}"

[auth.openapi.AdminToken]
bearer = "{admin}"
"""


@pytest.fixture(scope="module")
def servers(encoder_rm_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    common = dict(LIMITS, warmup="false", weights=json.dumps({"sparse": 0.5, "attention": 0.5}))
    spawned = {
        "tokens": spawn_server(encoder_rm_dir, tmp / "tokens.log", state_db=tmp / "tokens.sqlite3",
                               api_token=API_TOKEN, admin_token=ADMIN_TOKEN, **common),
        "open": spawn_server(encoder_rm_dir, tmp / "open.log", state_db=tmp / "open.sqlite3", **common),
    }
    try:
        for name, (proc, url) in spawned.items():
            wait_ready(proc, url, tmp / f"{name}.log")
        yield {name: url for name, (_, url) in spawned.items()}, tmp
    finally:
        stop(*(proc for proc, _ in spawned.values()))


def _run(url: str, tmp: Path, name: str, encoder_rm_dir, tokens: bool) -> dict:
    config = tmp / f"{name}.toml"
    config.write_text(CONFIG + (AUTH.format(api=API_TOKEN, admin=ADMIN_TOKEN) if tokens else ""))
    report = tmp / f"{name}-report"
    env = dict(os.environ, PYTHONPATH=str(ROOT), SCHEMATHESIS_HOOKS="tests.schema_fuzz_hooks",
               TC_FUZZ_URL=url, TC_FUZZ_RM=str(encoder_rm_dir), TC_FUZZ_LIMITS=json.dumps(LIMITS))
    if tokens:
        env["TC_FUZZ_API_TOKEN"] = API_TOKEN
    tally = tmp / f"{name}.tally"
    env["TC_FUZZ_TALLY"] = str(tally)
    cmd = [sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "run", f"{url}/openapi.json",
           "--checks", "all", "--max-examples", str(MAX_EXAMPLES), "--generation-deterministic", "--workers", "1",
           "--request-timeout", "120", "--continue-on-failure", "--no-color",
           "--report", "json", "--report-json-path", str(report / "report.json")]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    (tmp / f"{name}.out").write_text(out.stdout + out.stderr)
    assert (report / "report.json").is_file(), out.stdout[-4000:] + out.stderr[-4000:]
    result = json.loads((report / "report.json").read_text())
    assert result["failures"] == [] and result["errors"] == [] and out.returncode == 0, out.stdout[-12000:]
    # The hooks drop positive cases that break a rule no schema can state; enough must still reach each body route.
    kept = Counter(json.loads(line)["operation"] for line in tally.read_text().splitlines() if json.loads(line)["dropped"] is None)
    for operation in ("POST /v1/dense_rewards", "POST /openrlhf/get_reward", "POST /classify"):
        assert kept[operation] >= MIN_KEPT, (operation, kept)
    return result


def test_schema_fuzz(servers, encoder_rm_dir):
    urls, tmp = servers
    generated = {}
    for name, tokens in (("tokens", True), ("open", False)):
        result = _run(urls[name], tmp, name, encoder_rm_dir, tokens)
        assert result["operations"]["tested"] == result["operations"]["selected"] >= 13, result["operations"]
        generated[name] = result["test_cases"]["generated"]
    print(f"schemathesis cases generated: {generated}")
    assert sum(generated.values()) >= 1000, generated
