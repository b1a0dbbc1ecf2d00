"""Bayesian optimisation of the shaping weights (`tokencredit.bo`).

Real botorch fits on a synthetic noisy objective; the CLI against a real server subprocess (tiny encoder RM, admin
token) on loopback. The admin client it pushes weights with is tested in `tests/test_sdk_admin.py`.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from dataclasses import asdict
from pathlib import Path

import httpx
import numpy as np
import pytest

pytest.importorskip("botorch")  # installed by the `test` extra (tokencredit[bo])
import torch  # noqa: E402

from tests.support import running_server  # noqa: E402
from tokencredit.admin import AdminClient  # noqa: E402
from tokencredit.bo import BayesOpt, Study  # noqa: E402
from tokencredit.bo.cli import parse_objective  # noqa: E402

torch.set_num_threads(1)

TOKEN = "tc-bo-" + uuid.uuid4().hex
COMPONENTS = ["sparse", "attention", "shap", "lime", "loo"]
ALL = ("sparse", "attention", "shap", "lime", "loo", "prefix")
FULL = lambda w: {c: float(w.get(c, 0.0)) for c in ALL}  # noqa: E731

# Synthetic objective over the K=5 simplex with a known interior optimum: f(w) = 1 − ‖w − w*‖², f* = f(w*) = 1.
# f is concave, so its minimum over the simplex is at a vertex: F_MIN = min_k f(e_k) = −0.15 (at e_loo).
W_STAR = np.array([0.35, 0.25, 0.20, 0.15, 0.05])
F_STAR = 1.0
F_MIN = min(1.0 - float(np.sum((np.eye(5)[k] - W_STAR) ** 2)) for k in range(5))
NOISE_SD = 0.015 * (F_STAR - F_MIN)  # 1.5 % of the objective's range


def f(w) -> float:
    w = np.asarray([w[c] for c in COMPONENTS] if isinstance(w, dict) else w, dtype=np.float64)
    return 1.0 - float(np.sum((w - W_STAR) ** 2))


def _on_simplex(weights: dict) -> bool:
    return all(v >= 0.0 for v in weights.values()) and abs(sum(weights.values()) - 1.0) < 1e-9


# ---------------------------------------------------------------------------------------------------- optimisation
def _random_search(seed: int, budget: int) -> float:
    """Uniform points on the simplex; pick the best noisy observation; score its true f."""
    rng = np.random.default_rng(seed)
    points = rng.dirichlet(np.ones(5), size=budget)
    observed = np.array([f(w) for w in points]) + rng.normal(0.0, NOISE_SD, budget)
    return f(points[int(observed.argmax())])


def _bo_search(seed: int, budget: int, n_init: int) -> float:
    """One BO study on the noisy objective; the true f of the weights it reports as best."""
    noise = np.random.default_rng(1234 + seed)
    bo = BayesOpt(Study(COMPONENTS, seed=seed, n_init=n_init), num_restarts=4, raw_samples=128)  # fast settings
    for _ in range(budget):
        trial = bo.suggest()
        assert _on_simplex(trial.weights)
        bo.observe(trial, f(trial.weights) + noise.normal(0.0, NOISE_SD))
    assert [t.source for t in bo.study.trials] == ["sobol"] * n_init + ["bo"] * (budget - n_init)
    return f(bo.best().weights)


def test_bo_gets_near_the_optimum_and_beats_random_search():
    # Three studies, not one: a single seed's outcome also depends on the CPU's floating-point paths through
    # the GP fit (one seed gave 0.987 on one machine and 0.960 on another), so the claim is about the median.
    budget, n_init = 20, 6
    bests = [_bo_search(seed, budget, n_init) for seed in range(3)]
    # "Within 5 % of the optimum" as a share of the objective's range on the simplex, (f* − f(best)) / (f* − f_min):
    # unlike a share of f* it does not change when a constant is added to the objective.
    gaps = [(F_STAR - b) / (F_STAR - F_MIN) for b in bests]
    random_median = float(np.median([_random_search(seed, budget) for seed in range(11)]))
    print(f"\nf(best)={[round(b, 4) for b in bests]} f*={F_STAR} f_min={F_MIN:.3f} "
          f"gaps={[f'{g:.2%}' for g in gaps]} random-search median={random_median:.4f}")
    assert max(gaps) <= 0.05
    assert float(np.median(bests)) > random_median


def test_pending_suggestions_differ_and_observations_come_in_any_order(tmp_path):
    def play(path):
        bo = BayesOpt.open(path, COMPONENTS, seed=1, n_init=3, num_restarts=4, raw_samples=128)
        first = [bo.suggest() for _ in range(3)]  # three Sobol trials in flight at once
        for t in reversed(first):  # finished out of order
            bo.observe(t, f(t.weights))
        a, b = bo.suggest(), bo.suggest()  # two BO trials in flight: b sees a as X_pending
        bo.observe(b, f(b.weights))
        bo.observe(a.id, f(a.weights), noise=None)
        return bo, first, a, b

    bo, first, a, b = play(tmp_path / "one.json")
    assert len({tuple(t.weights.values()) for t in first}) == 3
    assert a.source == b.source == "bo"
    assert np.abs(np.subtract(list(a.weights.values()), list(b.weights.values()))).max() > 1e-3
    assert all(t.status == "complete" for t in bo.study.trials) and bo.pending() == []
    with pytest.raises(ValueError, match="already complete"):
        bo.observe(a, 0.0)
    assert bo.best().id in {t.id for t in bo.study.trials}
    # Deterministic given the seed: the same play in another study gives the same points.
    again = play(tmp_path / "two.json")[0]
    for x, y in zip(again.study.trials, bo.study.trials, strict=True):
        assert np.allclose(list(x.weights.values()), list(y.weights.values()), atol=1e-9)


def test_resume_keeps_observations_and_reoffers_pending(tmp_path):
    path = tmp_path / "study.json"
    bo = BayesOpt.open(path, COMPONENTS, seed=2, n_init=3)
    t0, t1, t2 = bo.suggest(), bo.suggest(), bo.suggest()
    bo.observe(t0, 0.5, noise=0.01)
    bo.fail(t1, "objective diverged")
    t3 = bo.suggest()  # fewer than two observations: still a Sobol point
    before = json.loads(path.read_text())
    del bo  # "killed": only the file survives

    resumed = BayesOpt.open(path, COMPONENTS, seed=99, n_init=10)  # the file's seed and n_init win
    assert (resumed.study.seed, resumed.study.n_init) == (2, 3)
    assert [asdict(t) for t in resumed.study.trials] == before["trials"]
    assert [t.id for t in resumed.pending()] == [t2.id, t3.id]
    again = [resumed.suggest(), resumed.suggest()]  # the pending trials come back first, same ids and weights
    assert [(t.id, t.weights) for t in again] == [(t2.id, t2.weights), (t3.id, t3.weights)]
    new = resumed.suggest()
    assert new.id == 4 and len(resumed.study.trials) == 5  # nothing duplicated
    resumed.observe(again[1], 0.7)
    reloaded = Study.load(path)
    assert reloaded.trial(3).value == 0.7 and reloaded.trial(1).note == "objective diverged"
    assert reloaded.trial(0).noise == 0.01
    assert [t.status for t in reloaded.trials] == ["complete", "failed", "pending", "complete", "pending"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study.json"]  # atomic saves leave no temp files
    with pytest.raises(ValueError, match="tunes"):
        Study.open(path, ["sparse", "shap"])


def test_parse_objective():
    assert parse_objective("loading...\n0.75\n\n") == (0.75, None)
    assert parse_objective("x\n0.75 0.02") == (0.75, 0.02)
    assert parse_objective('{"value": -1.5, "noise": 0.1}') == (-1.5, 0.1)
    assert parse_objective('{"value": 2}') == (2.0, None)
    for bad in ("", "accuracy: 0.7", "nan", "0.5 -1", "1 2 3", '{"noise": 1}'):
        with pytest.raises(ValueError):
            parse_objective(bad)


# ---------------------------------------------------------------------------------------------------- a real server
@pytest.fixture(scope="module")
def server(encoder_rm_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bo")
    settings = {"admin_token": TOKEN, "state_db": tmp / "shaping.sqlite3", "weights": json.dumps({"sparse": 1.0})}
    with running_server(encoder_rm_dir, tmp / "server.log", secret=TOKEN, **settings) as url:
        yield {"url": url, "tmp": tmp, "log": tmp / "server.log"}


def test_objective_failures_are_recorded_not_fatal(server, tmp_path):
    from tokencredit.bo.cli import _Runner

    study = Study(COMPONENTS, seed=0, n_init=1, path=tmp_path / "s.json")
    with AdminClient(server["url"], token=TOKEN) as admin:
        for command, timeout, expected in [("echo chatter; exit 3", None, "exit status 3; last output: chatter"),
                                           ("sleep 30", 0.5, "timed out after 0.5 s"),
                                           ("echo 0.5 0.1", None, None)]:
            trial = study.add_trial(dict(zip(COMPONENTS, [0.2] * 5)), "sobol")
            started = time.monotonic()
            outcome = _Runner(study, admin, command, timeout)(trial)
            assert outcome.error == expected and time.monotonic() - started < 10  # the timeout killed the group
            assert study.trial(trial.id).shaping_version == admin.get_shaping().version
    assert (outcome.value, outcome.noise) == (0.5, 0.1)


# ---------------------------------------------------------------------------------------------------- the CLI
OBJECTIVE = textwrap.dedent('''
    """Synthetic objective for `tokencredit bo run`: checks the pinned version holds the weights it was given."""
    import json, os, sys, time
    import httpx
    url, log_path, fail_id = sys.argv[1], sys.argv[2], int(sys.argv[3])
    weights = json.loads(os.environ["TOKENCREDIT_WEIGHTS"])
    version, trial = int(os.environ["TOKENCREDIT_SHAPING_VERSION"]), int(os.environ["TOKENCREDIT_TRIAL_ID"])
    auth = {{"Authorization": "Bearer " + os.environ["TOKENCREDIT_ADMIN_TOKEN"]}}
    history = httpx.get(url + "/admin/v1/shaping/history", headers=auth, timeout=10).json()["versions"]
    [record] = [v for v in history if v["version"] == version]
    if record["weights"] != weights:
        sys.exit(3)
    start = time.time()
    time.sleep(0.3)
    w_star = {w_star}
    value = 1.0 - sum((weights[c] - w_star[c]) ** 2 for c in w_star)
    with open(log_path, "a") as log:
        log.write(json.dumps({{"trial": trial, "version": version, "start": start, "end": time.time()}}) + "\\n")
    print("evaluating ...")
    print("no number here" if trial == fail_id else value)
''').format(w_star=dict(zip(COMPONENTS, W_STAR.tolist())))


def _cli(*args):
    exe = Path(sys.executable).with_name("tokencredit")
    assert exe.exists(), "the `tokencredit` console script is missing: pip install -e ./client[bo]"
    return [str(exe), *map(str, args)]


def _study(path):
    return json.loads(path.read_text()) if path.exists() else None


def test_cli_run_survives_a_kill_and_resumes(server, tmp_path):
    url, total, fail_id = server["url"], 7, 5
    script, log = tmp_path / "objective.py", tmp_path / "objective.log"
    study_path, plot = tmp_path / "study.json", tmp_path / "study.png"
    script.write_text(OBJECTIVE)
    cmd = f"{shlex.quote(sys.executable)} {shlex.quote(str(script))} {url} {shlex.quote(str(log))} {fail_id}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENCREDIT_")}
    env["MY_ADMIN_TOKEN"] = env["TOKENCREDIT_ADMIN_TOKEN"] = TOKEN
    args = ["bo", "run", "--service", url, "--trials", total, "--objective-cmd", cmd, "--study", study_path,
            "--components", ",".join(COMPONENTS), "--n-init", 3, "--seed", 5, "--admin-token-env", "MY_ADMIN_TOKEN",
            "--timeout", 60]

    # Wrong token: refused before a study file exists.
    bad = subprocess.run(_cli(*args), env=dict(env, MY_ADMIN_TOKEN="nope"), capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "401" in bad.stderr and not study_path.exists()

    first = subprocess.Popen(_cli(*args), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 90
    while True:  # kill once 3 trials are observed and the 4th has been pushed and is running
        s = _study(study_path)
        if s and sum(t["status"] == "complete" for t in s["trials"]) >= 3 and any(
                t["status"] == "pending" and t["shaping_version"] is not None for t in s["trials"]):
            break
        if first.poll() is not None:
            pytest.fail(f"the controller exited early:\n{first.stdout.read()}")
        assert time.monotonic() < deadline, "no kill point in 90 s"
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    out1 = first.communicate()[0]
    at_kill = _study(study_path)
    kept = [t for t in at_kill["trials"] if t["status"] == "complete"]
    pending = [t for t in at_kill["trials"] if t["status"] == "pending"]
    assert len(kept) >= 3 and pending and "trial 3/7" in out1

    # Resumed, two objective commands at a time.
    second = subprocess.run(_cli(*args, "--parallel", 2), env=env, capture_output=True, text=True, timeout=180)
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"resuming {study_path}" in second.stdout and "best: trial" in second.stdout
    final = _study(study_path)
    trials = final["trials"]
    assert len(trials) == total and [t["id"] for t in trials] == list(range(total))
    assert sum(t["status"] != "pending" for t in trials) == total  # N finished trials, none lost or duplicated
    assert [t["status"] for t in trials].count("failed") == 1 and "cannot read" in trials[fail_id]["note"]
    for t in kept:  # observations made before the kill are unchanged
        assert trials[t["id"]] == t
    for t in pending:  # the trial killed mid-run was run again (same weights, a new push)
        again = trials[t["id"]]
        assert again["status"] == "complete" and again["weights"] == t["weights"]
        assert again["shaping_version"] > t["shaping_version"]
    assert [t["source"] for t in trials] == ["sobol"] * 3 + ["bo"] * (total - 3)

    # Each trial's shaping version holds its weights (unlisted components 0), as the objective also checked.
    history = {v.version: v for v in AdminClient(url, token=TOKEN).history()}
    for t in trials:
        record = history[t["shaping_version"]]
        assert record.weights == FULL(t["weights"]) and record.updated_by.endswith(f"trial {t['id']}")
    runs = [json.loads(line) for line in log.read_text().splitlines()]
    assert {r["trial"] for r in runs} == set(range(total))
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert TOKEN not in out1 + second.stdout + second.stderr

    status = subprocess.run(_cli("bo", "status", "--study", study_path), capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    assert f"{total} trials ({total - 1} complete, 0 pending, 1 failed)" in status.stdout
    assert "best: trial" in status.stdout and len(status.stdout.splitlines()) == total + 3


PROGRESS_OBJECTIVE = textwrap.dedent('''
    """Prints to both streams; trial 1 runs until the test has watched it run (the gate file appears)."""
    import os, pathlib, sys, time
    trial = int(os.environ["TOKENCREDIT_TRIAL_ID"])
    print(f"step 1 of trial {trial}", flush=True)
    print(f"a warning on stderr from trial {trial}", file=sys.stderr, flush=True)
    if trial == 1:
        while not pathlib.Path(sys.argv[1]).exists():
            time.sleep(0.05)
    print(0.5 + trial / 10)
''')


def test_cli_run_shows_progress_keeps_logs_and_reports_to_the_server(server, tmp_path):
    url = server["url"]
    script, gate, study_path = tmp_path / "objective.py", tmp_path / "go", tmp_path / "prog.json"
    script.write_text(PROGRESS_OBJECTIVE)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENCREDIT_")}
    env["TOKENCREDIT_ADMIN_TOKEN"] = TOKEN
    cmd = f"{shlex.quote(sys.executable)} {shlex.quote(str(script))} {shlex.quote(str(gate))}"
    proc = subprocess.Popen(_cli("bo", "run", "--service", url, "--trials", 2, "--objective-cmd", cmd, "--study", study_path,
                                 "--components", "sparse,shap", "--n-init", 2, "--status-every", 0.3),
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # While trial 1 runs, the server shows it running, after trial 0's result.
        deadline = time.monotonic() + 90
        while True:
            r = httpx.get(f"{url}/v1/bo/studies/prog", timeout=10)
            shown = r.json() if r.status_code == 200 else None
            if shown and len(shown["trials"]) == 2 and shown["trials"][1]["running_for_s"] is not None:
                break
            assert proc.poll() is None and time.monotonic() < deadline, (r.text, proc.poll())
            time.sleep(0.1)
        assert shown["state"] == "running" and shown["target_trials"] == 2 and shown["components"] == ["sparse", "shap"]
        assert shown["trials"][0]["status"] == "complete" and shown["trials"][0]["value"] == 0.5
        assert shown["trials"][0]["running_for_s"] is None and shown["trials"][1]["status"] == "pending"
        time.sleep(2.5)  # the run loop ticks every second: long enough for a status line naming the running trial
        gate.touch()
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    logs = tmp_path / "prog.trials"
    assert f"trial logs: {logs}{os.sep}<id>.log" in out and f"progress: {url}/ui#bo/prog" in out
    for line in ("trial #0 started: sobol v", "trial 1/2  #0", "trial #1 started: sobol v", "trial 2/2  #1"):
        assert line in out, (line, out)
    assert re.search(r"^1/2 trials · running #1 \d+s · best 0\.5 \(trial 0\)$", out, re.M), out
    assert re.search(r"trial 2/2 .* -> 0\.6 in \d+s", out), out
    assert "\x1b" not in out  # no bar when stdout is not a terminal
    for trial in (0, 1):  # the whole output of each trial, both streams
        text = (logs / f"{trial}.log").read_text()
        assert text.startswith(f"=== trial {trial} · shaping version ")
        for line in (f"step 1 of trial {trial}", f"a warning on stderr from trial {trial}", str(0.5 + trial / 10)):
            assert line in text.splitlines(), (line, text)
        assert f"log {logs / f'{trial}.log'}" in out
    final = httpx.get(f"{url}/v1/bo/studies/prog", timeout=10).json()
    study = _study(study_path)
    assert final["state"] == "done" and [t["running_for_s"] for t in final["trials"]] == [None, None]
    for mine, theirs in zip(study["trials"], final["trials"], strict=True):
        assert {k: theirs[k] for k in ("id", "status", "value", "weights", "shaping_version")} == \
               {k: mine[k] for k in ("id", "status", "value", "weights", "shaping_version")}
        assert theirs["log"] == str((logs / f"{mine['id']}.log").resolve())
    best = int(re.search(r"^best: trial (\d+)", out, re.M).group(1))
    assert final["best_trial"] == best
    assert TOKEN not in out


def test_study_reports_need_the_admin_token(server):
    body = {"components": ["sparse", "shap"], "target_trials": 1, "trials": []}
    assert httpx.put(f"{server['url']}/admin/v1/bo/studies/x", json=body, timeout=10).status_code == 401
    bad = httpx.put(f"{server['url']}/admin/v1/bo/studies/no%20spaces", json=body, timeout=10,
                    headers={"Authorization": f"Bearer {TOKEN}"})
    assert bad.status_code == 422
    assert httpx.get(f"{server['url']}/v1/bo/studies/never-reported", timeout=10).status_code == 404


def test_progress_bar_on_a_terminal():
    import io

    from tokencredit.bo.progress import Progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    study = Study(["sparse", "shap"], n_init=2)
    first, second = study.add_trial({"sparse": 0.5, "shap": 0.5}, "sobol"), study.add_trial({"sparse": 1.0, "shap": 0.0}, "sobol")
    screen = Terminal()
    progress = Progress(4, screen)
    progress.started(first, 7, None)
    progress.started(second, 8, Path("/tmp/8.log"))
    progress.tick(study, None)
    assert screen.getvalue().endswith("\r\x1b[K[--------------------] 0/4 trials · running #0 0s, #1 0s · best none yet")
    study.set_version(first.id, 7)
    done = study.complete(first.id, 0.25)
    progress.finished(study, done, done)
    progress.tick(study, done)
    assert "\r\x1b[Ktrial 1/4  #0 sobol v7  sparse=0.500 shap=0.500  -> 0.25 in 0s  best 0.25 (trial 0)\n" in screen.getvalue()
    assert screen.getvalue().endswith("\r\x1b[K[#####---------------] 1/4 trials · running #1 0s · best 0.25 (trial 0)")
    progress.close()
    assert screen.getvalue().endswith("\r\x1b[K")
