"""The bilevel run: BO over shaping weights (outer) around PPO on SmolLM2 with TokenCredit rewards (inner).

    python -m examples.bilevel_sentiment.run            # the full run (REPORT.md; budget: 90 min on 2 cores)
    python -m examples.bilevel_sentiment.run --quick    # a ~3-minute smoke version of every phase

Phases, each a separate process talking to one TokenCredit service started here (embedded engine, demo RM):
  1. outer loop: `tokencredit bo run` proposes weights, pushes them through the admin API and runs the inner
     loop (`train.py`, pinned to `$TOKENCREDIT_SHAPING_VERSION`) as its objective command;
  2. arms: sparse, ABC-like, SHAP-dense and the BO-best weights, each for several seeds;
  3. `report.py` writes REPORT.md and the plots from the JSON results.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
BIN = Path(sys.executable).parent

# The fixed arms. ABC uses β = 0.8 on attention, as in every experiment script of the ABC paper's code.
ARMS = {
    "sparse": {"sparse": 1.0},
    "abc": {"sparse": 0.2, "attention": 0.8},
    "shap": {"shap": 1.0},
}
BO_COMPONENTS = "sparse,attention,shap,loo"

FULL = dict(steps=24, seeds=3, trials=8, n_init=4, batch_size=16, response_tokens=24, eval_prompts=32,
            eval_samples=2)
QUICK = dict(steps=2, seeds=1, trials=2, n_init=2, batch_size=4, response_tokens=8, eval_prompts=4,
             eval_samples=1)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a ~3-minute smoke run of every phase")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default: results/ or results-quick/ here)")
    ap.add_argument("--rm", default=None, help="reward model directory (default: the demo RM, built if missing)")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--seeds", type=int)
    ap.add_argument("--trials", type=int)
    ap.add_argument("--shap-rows", type=int, default=None, help="shap rows per response (default: the server's 8T)")
    ap.add_argument("--lime-samples", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of each trainer (the service uses 1)")
    ap.add_argument("--parallel", type=int, default=2,
                    help="trainers at once (BO: pending trials; arms: runs); 2 fits 2 cores with 1 thread each")
    ap.add_argument("--skip-bo", action="store_true", help="reuse the study.json already in --out")
    return ap.parse_args(argv)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_service(out: Path, rm: str | None, token: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ, TOKENCREDIT_ADMIN_TOKEN=token, TOKENCREDIT_STATE_DB=str(out / "shaping.db"),
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [str(BIN / "tokencredit-server"), "serve", "--port", str(port), "--log-level", "warning"]
    if rm:
        cmd += ["--model", rm]
    log = open(out / "service.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the service exited ({proc.returncode}); see {out / 'service.log'}")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.kill()
    raise RuntimeError("the service did not become ready in 300 s")


def train_cmd(url: str, cfg: dict, seed: int, out_json: Path, args, weights: dict | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "examples.bilevel_sentiment.train", "--service", url, "--seed", str(seed),
           "--steps", str(cfg["steps"]), "--batch-size", str(cfg["batch_size"]),
           "--response-tokens", str(cfg["response_tokens"]), "--eval-prompts", str(cfg["eval_prompts"]),
           "--eval-samples", str(cfg["eval_samples"]), "--threads", str(args.threads), "--out", str(out_json)]
    if args.shap_rows:
        cmd += ["--shap-rows", str(args.shap_rows)]
    if args.lime_samples:
        cmd += ["--lime-samples", str(args.lime_samples)]
    if weights is not None:
        cmd += ["--weights", json.dumps(weights)]
    return cmd


def run_bo(url: str, cfg: dict, out: Path, args, env: dict) -> None:
    trials_dir = out / "bo_trials"
    trials_dir.mkdir(exist_ok=True)
    # BO trials train with seed 100+, distinct from the arms' seeds 0..n, so the arms re-check the BO choice.
    objective = shlex.join(train_cmd(url, cfg, 100, trials_dir / "TRIAL.json", args)).replace(
        "TRIAL.json", "trial_${TOKENCREDIT_TRIAL_ID}.json")
    cmd = [str(BIN / "tokencredit"), "bo", "run", "--service", url, "--trials", str(cfg["trials"]),
           "--n-init", str(cfg["n_init"]), "--components", BO_COMPONENTS, "--seed", "0",
           "--parallel", str(args.parallel), "--study", str(out / "study.json"), "--plot", str(out / "bo.png"),
           "--objective-cmd", objective]
    subprocess.run(cmd, env=env, cwd=ROOT, check=True)


def best_weights(study_path: Path) -> dict:
    """The controller's best: the highest GP posterior mean among the observed trials."""
    from tokencredit.bo import BayesOpt, Study

    best = BayesOpt(Study.load(study_path)).best()
    return dict(best.weights)


def run_arms(jobs, arms: dict, url: str, cfg: dict, runs: Path, args, env: dict) -> None:
    """Each (arm, seed) in its own trainer process, `args.parallel` at a time; any failure stops the run."""
    waiting, running = list(jobs), []
    while waiting or running:
        while waiting and len(running) < args.parallel:
            arm, seed = waiting.pop(0)
            print(f"[arm {arm} seed {seed}] weights {arms[arm]}", flush=True)
            cmd = train_cmd(url, cfg, seed, runs / f"{arm}_seed{seed}.json", args, arms[arm])
            log = open(runs / f"{arm}_seed{seed}.log", "w")
            running.append((arm, seed, subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)))
        time.sleep(1)
        for job in list(running):
            arm, seed, proc = job
            if proc.poll() is None:
                continue
            running.remove(job)
            if proc.returncode != 0:
                for _, _, other in running:
                    other.kill()
                raise RuntimeError(f"arm {arm} seed {seed} failed ({proc.returncode}); see {runs}/{arm}_seed{seed}.log")
            print(f"[arm {arm} seed {seed}] done", flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    for key in ("steps", "seeds", "trials"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    out = args.out or HERE / ("results-quick" if args.quick else "results")
    out.mkdir(parents=True, exist_ok=True)
    timings = {}
    t0 = time.perf_counter()
    if args.rm is None:
        subprocess.run([str(BIN / "tokencredit-server"), "demo-model", "--if-missing"], check=True)
    from .policy import ensure_policy_weights

    ensure_policy_weights()
    timings["setup_s"] = time.perf_counter() - t0

    token = secrets.token_urlsafe(24)
    env = dict(os.environ, TOKENCREDIT_ADMIN_TOKEN=token, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    service, url = start_service(out, args.rm, token)
    try:
        t = time.perf_counter()
        # The untrained policy's held-out score (the same evaluation as every arm's, with no PPO step).
        subprocess.run(train_cmd(url, dict(cfg, steps=0), 0, out / "initial.json", args, {"sparse": 1.0}),
                       env=env, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        timings["initial_eval_s"] = time.perf_counter() - t
        t = time.perf_counter()
        if not args.skip_bo:
            for stale in ("study.json", "bo.png"):
                (out / stale).unlink(missing_ok=True)
            shutil.rmtree(out / "bo_trials", ignore_errors=True)
        if not args.skip_bo:
            run_bo(url, cfg, out, args, env)
        timings["bo_s"] = time.perf_counter() - t
        arms = dict(ARMS, bo_best=best_weights(out / "study.json"))
        runs = out / "runs"
        runs.mkdir(exist_ok=True)
        t = time.perf_counter()
        jobs = [(arm, seed) for seed in range(cfg["seeds"]) for arm in arms]
        run_arms(jobs, arms, url, cfg, runs, args, env)
        timings["arms_s"] = time.perf_counter() - t
    finally:
        service.terminate()
        service.wait(30)
    timings["total_s"] = time.perf_counter() - t0
    meta = {"config": cfg, "quick": args.quick, "arms": arms, "timings": timings, "rm": args.rm or "demo RM",
            "parallel": args.parallel, "threads": args.threads, "shap_rows": args.shap_rows,
            "lime_samples": args.lime_samples, "bo_components": BO_COMPONENTS}
    (out / "run.json").write_text(json.dumps(meta, indent=1))
    from .report import write_report

    report = write_report(out, HERE / "REPORT.md" if not args.quick else out / "REPORT.md")
    print(f"wrote {report} in {timings['total_s'] / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
