"""`tokencredit-server worker`: N solo-pool worker processes, each with its own model.

`--pool=solo` by default: CUDA contexts and torch's thread pools do not survive fork (celery #3402, transformers
#7516), so instead of a prefork pool, `--concurrency N` starts N independent processes of `--concurrency 1`
(one per GPU, round-robin over the visible GPUs, or one per CPU core). Each loads the model once, after it starts,
with one torch thread unless `--torch-threads` says otherwise. This parent only supervises: it forwards SIGTERM /
SIGINT and exits when the children have.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

from workers.settings import MODEL_FLAGS

__all__ = ["run_worker"]


def _visible_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:
        return 0


def _child_command(settings, args, index: int) -> list:
    cmd = [sys.executable, "-m", "service.cli", "worker", "--model", str(settings.model), "--broker", settings.broker_url,
           "--queue", settings.queue, "--concurrency", "1", "--pool", "solo", "--log-level", args.log_level,
           "--hostname", f"{args.hostname or 'tokencredit'}-{index}@{socket.gethostname()}"]
    for flag in MODEL_FLAGS:
        value = getattr(args, flag, None)
        if value is not None:
            cmd += [f"--{flag.replace('_', '-')}", str(value)]
    return cmd


def _supervise(settings, args) -> int:
    gpus = _visible_gpus()
    children = []
    for i in range(args.concurrency):
        env = dict(os.environ)
        if gpus > 1:
            env["CUDA_VISIBLE_DEVICES"] = str(i % gpus)  # one process per GPU, each sees "cuda" as its own
        children.append(subprocess.Popen(_child_command(settings, args, i), env=env))

    def forward(signum, _frame):
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    codes = [child.wait() for child in children]
    return max(codes, default=0)


def run_worker(settings, args) -> int:
    if args.concurrency > 1 and args.pool == "solo":
        return _supervise(settings, args)
    from workers.celery_app import make_celery
    from workers.tasks import register

    app = make_celery(settings)
    register(app, settings, solo=args.pool == "solo")
    hostname = args.hostname or f"tokencredit-{os.getpid()}@{socket.gethostname()}"
    argv = [
        "worker", f"--pool={args.pool}", f"--concurrency={args.concurrency}", "-Q", settings.queue,
        f"--loglevel={args.log_level.upper()}", "-n", hostname,
        # No mingle/gossip/heartbeat chatter: workers share nothing but the queue.
        "--without-mingle", "--without-gossip", "--without-heartbeat",
    ]
    app.worker_main(argv)
    return 0
