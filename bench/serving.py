"""Serving throughput: a training cluster's load on the embedded engine, micro-batching on the Celery path, and
the Celery path against the embedded one.

Starts real processes: Redis (the one at --redis, or its own redis-server when none answers), `--workers` solo
Celery workers, `serve --broker`, an embedded `serve`, and the baseline: an embedded `serve` that explains one
item at a time (`TOKENCREDIT_BATCH_MAX_ROWS=1`: every engine batch is one item, as before cross-request
batching), or, with `--before DIR`, the server of another checkout (e.g. `git worktree add /tmp/before HEAD~1`).
The result cache is off, so every item costs RM rows.

    embedded_scalar_speedup = throughput of --scalar-requests (1,024) concurrent single-sample
                              POST /openrlhf/get_reward, embedded server / baseline (answers 200 per second)
    embedded_scalar_errors  = answers other than 200 from the embedded server in that burst
    embedded_dense_speedup  = the same for --dense-requests (256) single-item /v1/dense_rewards, weights
                              attention + sparse
    scalar_p50_ms, ...      = latency percentiles of the embedded server's answers in each burst
    microbatch_ratio        = throughput of 64 concurrent one-item requests / one 64-item request   (Celery path)
    celery_over_embedded    = throughput of 32-item requests, Celery path / embedded path

With the default --workers 1 both paths have one engine process, so the last ratio is the price of the Celery hop
(publish, Redis round trips, JSON) and nothing else. On a shared machine every number moves with the other
processes' load: the two servers of a comparison run one after the other under the same conditions, best of
--repeats. Last line: `summary: microbatch_ratio=<x> celery_over_embedded=<y> embedded_scalar_speedup=<x>
embedded_scalar_errors=<n> embedded_dense_speedup=<y> scalar_p50_ms=... scalar_p99_ms=... dense_p50_ms=...
dense_p99_ms=... baseline_scalar_errors=<n>`.

Usage: python bench/serving.py [--model DIR] [--workers 1] [--items 64] [--batch 32] [--repeats 3]
                               [--scalar-requests 1024] [--dense-requests 256] [--before DIR] [--no-celery]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.http_burst import burst, percentile  # noqa: E402
PROMPT = "How was your day?"
RESPONSES = [
    "It was amazing, I had a great time with friends at the beach.",
    "Terrible, the train was late and I missed the whole meeting.",
    "Pretty average: some work, a walk, and a quiet dinner at home.",
    "Wonderful news at work today, the project finally shipped!",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _redis_up(host: str, port: int) -> bool:
    with contextlib.suppress(OSError):
        with socket.create_connection((host, port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    return False


def _items(n: int, tag: str) -> list:
    # Distinct texts of realistic length (the tag keeps runs apart even with a cache).
    return [{"prompt": PROMPT, "response": f"{RESPONSES[i % len(RESPONSES)]} ({tag} {i})"} for i in range(n)]


class Cluster:
    def __init__(self, args):
        self.args = args
        self.procs = []
        self.broker = None
        self.logs = Path(tempfile.mkdtemp(prefix="tc-bench-"))
        u = uuid.uuid4().hex[:8]
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENCREDIT_")}
        self.env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1",
                        TOKENCREDIT_WARMUP="false", TOKENCREDIT_CACHE_TTL_S="0", TOKENCREDIT_MAX_ITEMS="256",
                        TOKENCREDIT_QUEUE=f"tc-bench-{u}", TOKENCREDIT_KEY_PREFIX=f"tc-bench-{u}")

    def _spawn(self, name, cmd, env, cwd=ROOT):
        log = open(self.logs / f"{name}.log", "wb")
        self.procs.append(subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT))
        return self.procs[-1]

    def start(self) -> dict:
        a = self.args
        cli = [sys.executable, "-m", "service.cli"]
        ports = {"embedded": _free_port(), "baseline": _free_port()}
        self._spawn("api-embedded", cli + ["serve", "--model", a.model, "--port", str(ports["embedded"]), "--log-level", "warning"], self.env)
        if a.before:
            before = Path(a.before).resolve()
            self._spawn("api-baseline", cli + ["serve", "--model", a.model, "--port", str(ports["baseline"]), "--log-level", "warning"],
                        dict(self.env, PYTHONPATH=f"{before}{os.pathsep}{before / 'client'}"), cwd=before)
        else:
            self._spawn("api-baseline", cli + ["serve", "--model", a.model, "--port", str(ports["baseline"]), "--log-level", "warning"],
                        dict(self.env, TOKENCREDIT_BATCH_MAX_ROWS="1"))
        if not a.no_celery:
            ports["celery"] = self._start_celery(cli)
        urls = {k: f"http://127.0.0.1:{p}" for k, p in ports.items()}
        deadline = time.monotonic() + 600
        for u in urls.values():
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{u}/readyz", timeout=2).status_code == 200:
                        break
                if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                    raise SystemExit(f"a process failed to start; logs in {self.logs}")
                time.sleep(0.2)
        return urls

    def _start_celery(self, cli) -> int:
        a = self.args
        url = a.redis
        host, port = url.split("//")[1].split("/")[0].split(":")
        if not _redis_up(host, int(port)):
            port = str(_free_port())
            self._spawn("redis", [shutil.which("redis-server") or "redis-server", "--port", port, "--save", "", "--appendonly", "no"], self.env)
            url = f"redis://127.0.0.1:{port}/0"
            while not _redis_up("127.0.0.1", int(port)):
                time.sleep(0.05)
        self.broker = url
        env = dict(self.env, TOKENCREDIT_BROKER_URL=url)
        for i in range(a.workers):
            self._spawn(f"worker{i}", cli + ["worker", "--model", a.model, "--hostname", f"bench{i}"], env)
        port = _free_port()
        self._spawn("api-celery", cli + ["serve", "--model", a.model, "--port", str(port), "--log-level", "warning"], env)
        return port

    def stop(self):
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=10)
            if p.poll() is None:
                p.kill()
        # Leave nothing in a shared Redis: this run's queue, kombu's binding for it, and its keys.
        if self.broker is None:
            return
        with contextlib.suppress(Exception):
            import redis

            r = redis.Redis.from_url(self.broker, socket_timeout=2)
            queue, prefix = self.env["TOKENCREDIT_QUEUE"], self.env["TOKENCREDIT_KEY_PREFIX"]
            r.delete(queue, f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}", *r.scan_iter(f"{prefix}:*", count=1000))


async def _post(client, url, items, weights):
    r = await client.post(f"{url}/v1/dense_rewards", json={"items": items, "weights": weights}, timeout=300)
    r.raise_for_status()
    out = r.json()
    bad = [x["error"] for x in out["results"] if x["error"] is not None]
    if bad:
        raise RuntimeError(f"item errors: {bad[:2]}")
    return out


async def _timed(coro_factory, repeats: int) -> float:
    """Best of `repeats` wall times (the least disturbed by the other processes sharing the machine)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        await coro_factory()
        best = min(best, time.perf_counter() - start)
    return best


def _bursts(kind: str, n: int, tag: str) -> list:
    """n single-sample requests, all distinct: OpenRLHF's remote-RM call, or a one-item dense request."""
    out = []
    for i, it in enumerate(_items(n, tag)):
        if kind == "scalar":
            out.append(("/openrlhf/get_reward", {"query": [f"{it['prompt']} {it['response']}"], "prompts": [it["prompt"]], "labels": [None]}))
        else:
            out.append(("/v1/dense_rewards", {"items": [dict(it, id=str(i))], "weights": {"sparse": 0.5, "attention": 0.5}}))
    return out


async def load_test(args, urls) -> dict:
    """A cluster's burst against the embedded server and the baseline, repeat by repeat alternating, best of each."""
    tag = iter(range(10**6))
    hosts = {name: urls[name].split("//")[1].split(":") for name in ("embedded", "baseline")}
    for name, (host, port) in hosts.items():  # warm-up: lazy imports, first forward passes of several sizes
        await burst(host, int(port), _bursts("scalar", 16, f"w{next(tag)}") + _bursts("dense", 16, f"w{next(tag)}"))
    out = {}
    for kind, n in (("scalar", args.scalar_requests), ("dense", args.dense_requests)):
        best = {}
        for _ in range(args.load_repeats):
            for name, (host, port) in hosts.items():
                answers, wall = await burst(host, int(port), _bursts(kind, n, f"{kind}{next(tag)}"))
                ok = [a for a in answers if a.status == 200 and not _item_errors(a)]
                rate = len(ok) / wall
                print(f"{name}: {n} concurrent {kind} requests in {wall:.2f} s: {len(ok)} answered, "
                      f"{n - len(ok)} errors ({_statuses(answers)}), {rate:.1f} answers/s")
                if name not in best or rate > best[name][0]:
                    best[name] = (rate, n - len(ok), [a.seconds for a in ok])
        out[f"{kind}_speedup"] = best["embedded"][0] / max(best["baseline"][0], 1e-9)
        out[f"{kind}_errors"] = best["embedded"][1]
        out[f"baseline_{kind}_errors"] = best["baseline"][1]
        out[f"{kind}_p50_ms"] = 1000 * percentile(best["embedded"][2], 50)
        out[f"{kind}_p99_ms"] = 1000 * percentile(best["embedded"][2], 99)
    return out


def _item_errors(answer) -> bool:
    results = (answer.body or {}).get("results")
    return bool(results) and any(r.get("error") for r in results)


def _statuses(answers) -> str:
    counts = {}
    for a in answers:
        counts[a.status] = counts.get(a.status, 0) + 1
    return ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))


async def run(args, urls) -> None:
    load = await load_test(args, urls)
    line = (f"embedded_scalar_speedup={load['scalar_speedup']:.2f} embedded_scalar_errors={load['scalar_errors']} "
            f"embedded_dense_speedup={load['dense_speedup']:.2f} scalar_p50_ms={load['scalar_p50_ms']:.0f} "
            f"scalar_p99_ms={load['scalar_p99_ms']:.0f} dense_p50_ms={load['dense_p50_ms']:.0f} "
            f"dense_p99_ms={load['dense_p99_ms']:.0f} baseline_scalar_errors={load['baseline_scalar_errors']}")
    if args.no_celery:
        print(f"summary: {line}")
        return
    urls = {"celery": urls["celery"], "embedded": urls["embedded"]}
    weights = json.loads(args.weights)
    tag = iter(range(10**6))
    limits = httpx.Limits(max_connections=args.items + 8, max_keepalive_connections=args.items + 8)
    async with httpx.AsyncClient(limits=limits) as client:
        for url in urls.values():  # warm-up: lazy imports, first forward passes, connections
            await _post(client, url, _items(args.batch, f"warm{next(tag)}"), weights)
            await asyncio.gather(*[_post(client, url, [it], weights) for it in _items(8, f"warm{next(tag)}")])

        celery = urls["celery"]
        one = await _timed(lambda: _post(client, celery, _items(args.items, f"one{next(tag)}"), weights), args.repeats)

        async def singles():
            await asyncio.gather(*[_post(client, celery, [it], weights) for it in _items(args.items, f"single{next(tag)}")])

        many = await _timed(singles, args.repeats)
        ratio = one / many
        print(f"celery: one {args.items}-item request {one:.3f} s; {args.items} concurrent one-item requests {many:.3f} s")

        # The two paths alternate, repeat by repeat, so load from other processes on the machine hits both alike.
        best = {name: float("inf") for name in urls}
        for _ in range(args.repeats):
            for name, url in urls.items():
                async def batches(url=url):
                    for _ in range(args.batches):
                        await _post(client, url, _items(args.batch, f"b{next(tag)}"), weights)

                best[name] = min(best[name], await _timed(batches, 1))
        per_path = {name: args.batches * args.batch / seconds for name, seconds in best.items()}
        for name, seconds in best.items():
            print(f"{name}: {args.batches} requests of {args.batch} items in {seconds:.3f} s = {per_path[name]:.1f} items/s")
    print(f"summary: microbatch_ratio={ratio:.3f} celery_over_embedded={per_path['celery'] / per_path['embedded']:.3f} {line}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="RM directory (default: the demo RM, built if missing)")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--items", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--weights", default='{"sparse": 0.2, "attention": 0.4, "loo": 0.4}', help="cheap by default")
    parser.add_argument("--scalar-requests", type=int, default=1024, help="concurrent single-sample OpenRLHF requests")
    parser.add_argument("--dense-requests", type=int, default=256, help="concurrent one-item attention+sparse requests")
    parser.add_argument("--load-repeats", type=int, default=1, help="bursts per server and kind (best kept)")
    parser.add_argument("--before", default=None, help="baseline: serve from this checkout instead of one-at-a-time")
    parser.add_argument("--no-celery", action="store_true", help="only the embedded load test (no Redis, no workers)")
    args = parser.parse_args()
    if args.model is None:
        sys.path.insert(0, str(ROOT))
        from workers.demo_model import ensure_demo_model

        args.model = str(ensure_demo_model())
    cluster = Cluster(args)
    try:
        urls = cluster.start()
        asyncio.run(run(args, urls))
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
