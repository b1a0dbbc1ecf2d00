"""`tokencredit bo run | status`: tune the server's shaping weights against an objective command.

For each trial `run` pushes the suggested weights through the admin API (a new shaping version, If-Match safe
against other writers), runs the objective command through the shell with

    TOKENCREDIT_SHAPING_VERSION  the version to pin (`"shaping_version": N` in dense-rewards requests)
    TOKENCREDIT_TRIAL_ID         the trial's id in the study
    TOKENCREDIT_WEIGHTS          the weights as a JSON object (every component; those not tuned are 0)

and reads the objective from the last non-empty line the command prints: `0.71`, `0.71 0.02` (value and its
standard deviation) or `{"value": 0.71, "noise": 0.02}`. A non-zero exit, a timeout or an unreadable line marks
the trial failed (with the reason) and the run goes on. The study file is saved after every change, so a killed
run started again with the same `--study` continues to `--trials` finished trials, re-running first the trials
that were pending.

Everything each command prints (stdout and stderr) goes to `<study>.trials/<id>.log` (`--logs DIR`), appended
per attempt; `run` prints a line when a trial starts and ends, and on a terminal a progress bar (trials done,
running trials' elapsed time, best so far). The study is reported to the server after every change, so the
server's page (`URL/ui#bo`) shows it live (`--no-report` to skip).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

from tokencredit.admin import TOKEN_ENV
from tokencredit.bo.progress import Progress
from tokencredit.bo.progress import fmt_weights as _fmt_weights
from tokencredit.bo.report import StudyReporter, report_name, study_report
from tokencredit.bo.study import COMPLETE, FAILED, PENDING, Study, Trial
from tokencredit.types import Component

__all__ = ["add_parser", "parse_objective"]

# `prefix` needs a causal RM: opt in with --components.
DEFAULT_COMPONENTS = ",".join(c.value for c in Component if c is not Component.prefix)


def add_parser(subparsers) -> None:
    bo = subparsers.add_parser("bo", help="Bayesian optimisation of the shaping weights",
                               description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = bo.add_subparsers(dest="bo_command", required=True)

    run = sub.add_parser("run", help="run (or resume) a study against a live server")
    run.add_argument("--service", required=True, help="the TokenCredit server, e.g. http://127.0.0.1:8000")
    run.add_argument("--trials", type=int, required=True, help="finished trials (complete or failed) to reach")
    run.add_argument("--objective-cmd", required=True, help="shell command printing the objective on its last line")
    run.add_argument("--study", default="study.json", help="study file, created or resumed (default study.json)")
    run.add_argument("--components", default=DEFAULT_COMPONENTS, help=f"weights to tune (default {DEFAULT_COMPONENTS})")
    run.add_argument("--n-init", type=int, default=5, help="Sobol trials before the GP takes over (default 5)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--minimize", action="store_true", help="minimise the objective (default: maximise)")
    run.add_argument("--plot", help="PNG written after every observation (default: the study file's name .png)")
    run.add_argument("--admin-token-env", default=TOKEN_ENV, help="variable holding the admin token")
    run.add_argument("--timeout", type=float, default=None, help="seconds per objective command (default: none)")
    run.add_argument("--parallel", type=int, default=1, help="objective commands running at once (default 1)")
    run.add_argument("--logs", help="folder of the trials' output, <id>.log each (default: the study file's name .trials)")
    run.add_argument("--no-report", dest="report", action="store_false",
                     help="do not report the study to the server (its page /ui#bo then does not show it)")
    run.add_argument("--status-every", type=float, default=60.0,
                     help="seconds between status lines when stdout is not a terminal (default 60)")
    run.set_defaults(func=cmd_run)

    status = sub.add_parser("status", help="print a study")
    status.add_argument("--study", default="study.json")
    status.set_defaults(func=cmd_status)


# ---------------------------------------------------------------------------------------------------- parsing
def parse_objective(stdout: str) -> Tuple[float, Optional[float]]:
    """(value, noise) from the last non-empty line; ValueError when it is none of the accepted forms."""
    lines = [line.strip() for line in stdout.splitlines() if line.strip()]
    if not lines:
        raise ValueError("the objective command printed nothing")
    last = lines[-1]
    try:
        if last.startswith("{"):
            obj = json.loads(last)
            value, noise = obj["value"], obj.get("noise")
        else:
            parts = last.split()
            if len(parts) not in (1, 2):
                raise ValueError
            value, noise = parts[0], (parts[1] if len(parts) == 2 else None)
        value, noise = float(value), (None if noise is None else float(noise))
    except (ValueError, KeyError, TypeError, json.JSONDecodeError):
        raise ValueError(f"cannot read an objective from the last line {last[:200]!r}") from None
    if not math.isfinite(value) or (noise is not None and (not math.isfinite(noise) or noise < 0)):
        raise ValueError(f"objective not finite or negative noise in {last[:200]!r}")
    return value, noise


def _components(text: str) -> list:
    names = [c.strip() for c in text.split(",") if c.strip()]
    known = [c.value for c in Component]
    bad = [c for c in names if c not in known]
    if bad:
        raise SystemExit(f"tokencredit bo: unknown components {bad}; known: {known}")
    return names


# ---------------------------------------------------------------------------------------------------- one trial
@dataclass
class _Outcome:
    value: Optional[float] = None
    noise: Optional[float] = None
    error: Optional[str] = None


class _Runner:
    """Pushes a trial's weights and runs the objective command (in worker threads), its output into a log file."""

    def __init__(self, study: Study, admin, command: str, timeout: Optional[float], log_dir: Optional[Path] = None,
                 on_start: Optional[Callable[[Trial, int, Optional[Path]], None]] = None):
        self.study, self.admin, self.command, self.timeout = study, admin, command, timeout
        if log_dir is None and study.path is not None:
            log_dir = study.path.with_suffix(".trials")
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.on_start = on_start
        self._procs: Dict[int, subprocess.Popen] = {}
        self._lock = threading.Lock()

    def log_path(self, trial_id: int) -> Optional[Path]:
        return None if self.log_dir is None else self.log_dir / f"{trial_id}.log"

    def __call__(self, trial: Trial) -> _Outcome:
        weights = {c.value: 0.0 for c in Component}
        weights.update(trial.weights)
        name = self.study.path.name if self.study.path else "study"
        # Raises TokenCreditError (auth, server down): the trial stays pending and the run stops.
        record = self.admin.update_shaping(weights, updated_by=f"tokencredit bo {name} trial {trial.id}")
        self.study.set_version(trial.id, record.version)
        env = dict(os.environ, TOKENCREDIT_SHAPING_VERSION=str(record.version), TOKENCREDIT_TRIAL_ID=str(trial.id),
                   TOKENCREDIT_WEIGHTS=json.dumps(weights))
        log_path = self.log_path(trial.id)
        log = None
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            # Appended: a trial re-run after a crash keeps the killed attempt's output above the new one.
            log = open(log_path, "a", encoding="utf-8", errors="replace")
            log.write(f"=== trial {trial.id} · shaping version {record.version} · "
                      f"{datetime.now(timezone.utc).isoformat(timespec='seconds')} · {json.dumps(trial.weights)}\n")
            log.flush()
        if self.on_start is not None:
            self.on_start(trial, record.version, log_path)
        try:
            stdout, returncode, timed_out = self._run(env, trial.id, log)
        finally:
            if log is not None:
                log.close()
        if timed_out:
            return _Outcome(error=f"timed out after {self.timeout:g} s")
        if returncode != 0:
            tail = " | ".join(stdout.strip().splitlines()[-3:])[:500]
            return _Outcome(error=f"exit status {returncode}" + (f"; last output: {tail}" if tail else ""))
        try:
            value, noise = parse_objective(stdout)
        except ValueError as exc:
            return _Outcome(error=str(exc))
        return _Outcome(value=value, noise=noise)

    def _run(self, env: dict, trial_id: int, log) -> Tuple[str, int, bool]:
        """(stdout, exit status, timed out). stdout is kept (its last line is the objective) and copied line by
        line into the log; stderr goes straight to the log (the same append-mode file, so lines interleave as
        they were written)."""
        # Its own session, so a timeout kills the whole process group (a training run the shell started too).
        proc = subprocess.Popen(self.command, shell=True, env=env, stdout=subprocess.PIPE, stderr=log, text=True,
                                errors="replace", start_new_session=True)
        with self._lock:
            self._procs[trial_id] = proc
        lines = []

        def copy() -> None:
            for line in proc.stdout:
                lines.append(line)
                if log is not None:
                    log.write(line)
                    log.flush()

        reader = threading.Thread(target=copy, name=f"tokencredit-bo-trial-{trial_id}", daemon=True)
        reader.start()
        timed_out = False
        try:
            proc.wait(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
            proc.wait()
        finally:
            with self._lock:
                self._procs.pop(trial_id, None)
        reader.join()
        return "".join(lines), proc.returncode, timed_out

    def kill_all(self) -> None:
        with self._lock:
            for proc in self._procs.values():
                _kill_group(proc)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# ---------------------------------------------------------------------------------------------------- commands
def cmd_run(args) -> int:
    if not args.objective_cmd.strip():
        # Every trial would fail while still pushing weights; docker-compose's bo service passes "" when unset.
        raise SystemExit("tokencredit bo: --objective-cmd is empty (docker compose: set TOKENCREDIT_BO_OBJECTIVE_CMD)")
    from tokencredit.admin import AdminClient
    from tokencredit.bo.controller import BayesOpt
    from tokencredit.bo.plot import save_plot
    from tokencredit.errors import TokenCreditError

    if args.trials < 1 or args.parallel < 1:
        raise SystemExit("tokencredit bo: --trials and --parallel must be >= 1")
    components = _components(args.components)
    # "" rather than None: a missing variable must not fall back to TOKENCREDIT_ADMIN_TOKEN behind the user's back.
    admin = AdminClient(args.service, token=os.environ.get(args.admin_token_env, ""), timeout=30.0)
    try:
        current = admin.get_shaping()  # fail fast on a wrong URL or token, before a study file is created
    except TokenCreditError as exc:
        admin.close()
        print(f"tokencredit bo: cannot use the admin API at {args.service}: {exc}", file=sys.stderr)
        return 2
    if current.deployment:  # versions are numbered per deployment: say whose weights this run tunes
        print(f"tuning deployment {current.deployment} (current shaping version {current.version})", flush=True)
    try:
        study = Study.open(args.study, components, seed=args.seed, n_init=args.n_init,
                           direction="minimize" if args.minimize else "maximize")
    except ValueError as exc:
        admin.close()
        raise SystemExit(f"tokencredit bo: {exc}")
    if study.trials:
        print(f"resuming {args.study}: {study.finished()} finished, {len(study.pending())} pending "
              f"(seed {study.seed}, n_init {study.n_init})", flush=True)
    bo = BayesOpt(study)
    plot_path = Path(args.plot) if args.plot else Path(args.study).with_suffix(".png")
    log_dir = Path(args.logs) if args.logs else Path(args.study).with_suffix(".trials")
    progress = Progress(args.trials, every_s=args.status_every)
    reporter = None
    if args.report:
        # Its own client with a short timeout: a report must never hold up a trial, nor Ctrl-C for long.
        name = report_name(Path(args.study))
        reporter = StudyReporter(AdminClient(args.service, token=os.environ.get(args.admin_token_env, ""), timeout=5.0), name)
    best: Optional[Trial] = bo.best() if study.completed() else None

    def send(state: str, running: Optional[Dict[int, float]] = None) -> None:
        if reporter is not None:
            reporter.report(lambda: study_report(
                study, target_trials=args.trials, state=state, running=progress.running() if running is None else running,
                best=best, best_how=_best_how(study), log_path=runner.log_path))

    def on_start(trial: Trial, version: int, log_path: Optional[Path]) -> None:
        progress.started(trial, version, log_path)
        send("running")

    runner = _Runner(study, admin, args.objective_cmd, args.timeout, log_dir=log_dir, on_start=on_start)
    print(f"trial logs: {log_dir}{os.sep}<id>.log", flush=True)
    if reporter is not None:
        print(f"progress: {args.service.rstrip('/')}/ui#bo/{reporter.name}", flush=True)
    if threading.current_thread() is threading.main_thread():
        # SIGTERM unwinds like Ctrl-C, so the objective commands (in their own sessions) are stopped too.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    running: Dict = {}
    plotted = False
    fatal: Optional[BaseException] = None
    last_report = time.monotonic()
    interrupted = False
    send("running")
    pool = ThreadPoolExecutor(max_workers=args.parallel, thread_name_prefix="tokencredit-bo")
    try:
        while True:
            while fatal is None and len(running) < args.parallel and study.finished() + len(running) < args.trials:
                trial = bo.suggest()
                running[pool.submit(runner, trial)] = trial
            if not running:
                break
            # Wakes every second without a result, for the progress bar and the server's heartbeat.
            done, _ = wait(running, timeout=1.0, return_when=FIRST_COMPLETED)
            for future in done:
                trial = running.pop(future)
                try:
                    outcome = future.result()
                except TokenCreditError as exc:
                    progress.forget(trial.id)
                    fatal = fatal or exc  # the trial stays pending: a later run re-runs it
                    print(f"tokencredit bo: trial {trial.id}: pushing the weights failed: {exc}", file=sys.stderr)
                    continue
                if outcome.error is None:
                    trial = bo.observe(trial, outcome.value, outcome.noise)
                else:
                    trial = bo.fail(trial, outcome.error)
                best = bo.best()
                progress.finished(study, trial, best)
                save_plot(study, plot_path, best)
                plotted = True
                send("running")
                last_report = time.monotonic()
            progress.tick(study, best)
            if time.monotonic() - last_report >= _HEARTBEAT_S:
                send("running")  # the page shows how long the running trials have been going
                last_report = time.monotonic()
    except BaseException as exc:
        runner.kill_all()  # Ctrl-C: the objective commands run in their own sessions, stop them too
        progress.close()
        send("stopped", running={})
        if not isinstance(exc, KeyboardInterrupt):
            raise
        interrupted = True
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        admin.close()
    if interrupted:
        print(f"interrupted: {args.study} keeps every finished trial; the same command resumes "
              f"(re-running the {len(study.pending())} pending)", file=sys.stderr, flush=True)
        return 130
    progress.close()
    send("stopped" if fatal is not None else "done", running={})
    if reporter is not None:
        reporter.admin.close()
    if fatal is not None:
        return 1
    best = bo.best()
    if best is not None:
        if not plotted:  # a resumed study that had nothing left to run
            save_plot(study, plot_path, best)
        print(f"best: trial {best.id} value {best.value:.6g} (shaping version {best.shaping_version}) "
              f"{_fmt_weights(best.weights)}", flush=True)
    print(f"study: {args.study}  plot: {plot_path}  logs: {log_dir}", flush=True)
    return 0


# Seconds between reports while nothing starts or ends (the page's "last report" age and running times).
_HEARTBEAT_S = 30.0


def _best_how(study: Study) -> str:
    # As BayesOpt.best(): a GP's choice once two trials are observed.
    return "highest GP posterior mean among observed trials" if len(study.completed()) >= 2 else "best observed value"


def cmd_status(args) -> int:
    path = Path(args.study)
    if not path.exists():
        print(f"tokencredit bo: no study at {path}", file=sys.stderr)
        return 2
    study = Study.load(path)
    try:
        from tokencredit.bo.controller import BayesOpt

        best, how = BayesOpt(study).best(), "highest GP posterior mean among observed trials"
    except ImportError:  # botorch not installed: the raw best still says something
        best, how = study.best_observed(), "best observed value"
    counts = {s: len(study.by_status(s)) for s in (COMPLETE, PENDING, FAILED)}
    print(f"study {path}: {len(study.trials)} trials ({counts[COMPLETE]} complete, {counts[PENDING]} pending, "
          f"{counts[FAILED]} failed); {study.direction}; components {','.join(study.components)}; "
          f"seed {study.seed}; n_init {study.n_init}")
    print(f"{'id':>4} {'status':9} {'source':6} {'version':>7} {'value':>12}  weights")
    for t in study.trials:
        value = "" if t.value is None else f"{t.value:.6g}" + ("" if t.noise is None else f"±{t.noise:.2g}")
        version = "" if t.shaping_version is None else str(t.shaping_version)
        note = f"  ({t.note})" if t.note else ""
        print(f"{t.id:>4} {t.status:9} {t.source:6} {version:>7} {value:>12}  {_fmt_weights(t.weights)}{note}")
    if best is not None:
        print(f"best: trial {best.id} value {best.value:.6g} ({how}) {_fmt_weights(best.weights)}")
    return 0
