"""The Celery path against real parts: Redis at 127.0.0.1:6379, two worker processes, an API process.

Answers are compared with the engine run in this process (exactly what `EmbeddedExecutor` runs) for exact
equality: every item's explainers are seeded and its RM rows evaluated on their own, with one torch thread on both
sides, so the batch an item lands in cannot change a bit of its answer.
"""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.support import (
    DEFAULT_REDIS, cleanup_redis, metric, require_default_redis, spawn_api, spawn_worker, stop, unique_names, wait_ready,
    wait_worker_loaded,
)

PROMPT = "Tell me about the movie."
CHEAP = {"sparse": 0.4, "attention": 0.3, "loo": 0.3}
# ~0.15 s of RM work per item on the tiny RM: long enough that a worker is killed in the middle of its batch.
SLOW = {"weights": {"sparse": 0.5, "lime": 0.5}, "methods": {"lime": {"num_samples": 3000, "seed": 7}}}


@pytest.fixture(scope="module")
def cluster(encoder_rm_dir, tmp_path_factory):
    require_default_redis()
    logs = tmp_path_factory.mktemp("celery")
    # Short visibility timeout: a task stranded by a killed worker is redelivered after ~3 s, not the 60 s default.
    # Row budget ≈ 2 SLOW items per task, so the 40-request burst spreads over both workers in ~20 tasks.
    names = unique_names("main")
    settings = dict(names, visibility_timeout_s=3, batch_max_rows=6500)
    workers = [spawn_worker(encoder_rm_dir, logs / f"w{i}.log", DEFAULT_REDIS, f"w{i}@test", **settings) for i in range(2)]
    api, url = spawn_api(encoder_rm_dir, logs / "api.log", DEFAULT_REDIS, **settings)
    try:
        wait_ready(api, url, logs / "api.log")
        for i, w in enumerate(workers):
            wait_worker_loaded(w, logs / f"w{i}.log")
        yield {"url": url, "workers": workers, "logs": logs}
    finally:
        stop(api, *workers)
        cleanup_redis(DEFAULT_REDIS, names)


@pytest.fixture(scope="module")
def engine(encoder_rm_dir):
    """The embedded path's engine, loaded by its own loader in this process."""
    from service.config import Settings
    from service.executor import EmbeddedExecutor

    embedded = EmbeddedExecutor(Settings(model=str(encoder_rm_dir), warmup=False))
    embedded._load()
    embedded.shutdown()
    return embedded.engine


def _reference(engine, body: dict) -> list:
    from tokencredit.types import DenseRewardsRequest

    request = DenseRewardsRequest.model_validate(body)
    return [r.model_dump(mode="json") for r in engine.run(request, request.weights).results]


def _same(got: dict, want: dict) -> None:
    assert got["error"] is None, got["error"]
    for k in ("id", "score", "token_rewards", "spans", "coverage", "rm_tokens"):
        assert got[k] == want[k], (k, got[k], want[k])


def test_same_answers_as_embedded(cluster, engine):
    body = {
        "items": [
            {"prompt": PROMPT, "response": "The movie was wonderful and the acting was superb."},
            {"prompt": PROMPT, "response": "What a waste of two hours, awful plot.", "id": "b"},
            {"prompt": PROMPT, "response": "It was amazing!", "response_token_offsets": [[0, 2], [3, 6], [7, 15]]},
        ],
        "weights": CHEAP,
    }
    r = httpx.post(f"{cluster['url']}/v1/dense_rewards", json=body, timeout=60)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["usage"]["rm_rows"] > 0 and out["model"]["kind"] == "encoder"
    for got, want in zip(out["results"], _reference(engine, body)):
        _same(got, want)


def test_cache_hit_costs_no_rows(cluster):
    url = cluster["url"]
    body = {"items": [{"prompt": PROMPT, "response": "A cached answer, please."}], "weights": CHEAP}
    first = httpx.post(f"{url}/v1/dense_rewards", json=body, timeout=60).json()
    before = httpx.get(f"{url}/metrics").text
    second = httpx.post(f"{url}/v1/dense_rewards", json={**body, "items": [{**body["items"][0], "id": "again"}]}, timeout=60).json()
    after = httpx.get(f"{url}/metrics").text
    assert first["usage"]["rm_rows"] > 0 and second["usage"]["rm_rows"] == 0
    assert second["results"][0]["id"] == "again"
    assert second["results"][0]["token_rewards"] == first["results"][0]["token_rewards"]
    assert metric(after, "tokencredit_cache_hits_total") == metric(before, "tokencredit_cache_hits_total") + 1
    assert metric(after, "tokencredit_rm_rows_total") == metric(before, "tokencredit_rm_rows_total")
    assert 'tokencredit_requests_total{endpoint="/v1/dense_rewards",method="POST",status="200"}' in after


def test_messages_items_through_workers_and_the_cache(cluster, engine):
    # Items travel to workers as JSON and are validated again there; the cache key covers the whole conversation,
    # so the same response after another history is explained again, not served from the cache.
    url = cluster["url"]
    answer = {"role": "assistant", "content": [{"type": "text", "text": "It was "}, {"type": "text", "text": "wonderful."}]}
    histories = [[{"role": "user", "content": PROMPT}], [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "And the book?"}]]
    for history in histories:
        body = {"items": [{"messages": history + [answer], "id": "chat"}], "weights": CHEAP}
        r = httpx.post(f"{url}/v1/dense_rewards", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["rm_rows"] > 0
        _same(r.json()["results"][0], _reference(engine, body)[0])
    again = httpx.post(f"{url}/v1/dense_rewards", json=body, timeout=60).json()
    assert again["usage"]["rm_rows"] == 0


def test_bad_input_never_reaches_a_worker(cluster):
    url = cluster["url"]
    before = metric(httpx.get(f"{url}/metrics").text, "tokencredit_batch_items_count")
    too_long = {"items": [{"prompt": PROMPT, "response": "word " * 600}], "weights": CHEAP}
    r = httpx.post(f"{url}/v1/dense_rewards", json=too_long, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["field"] == "items[0].response"
    after = metric(httpx.get(f"{url}/metrics").text, "tokencredit_batch_items_count")
    assert after == before


def _cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _busy(pid: int, window: float = 0.1) -> bool:
    """The process used at least half a core over the window: it is running a task, not waiting for one."""
    before = _cpu_seconds(pid)
    time.sleep(window)
    return _cpu_seconds(pid) - before >= window / 2


def test_sigkill_a_worker_mid_run(cluster, engine):
    """40 concurrent requests; one worker is SIGKILLed mid-batch; every request is answered once, exactly."""
    url = cluster["url"]
    bodies = [
        {"items": [{"id": f"r{i}", "prompt": PROMPT, "response": f"Request number {i} was good, then bad, then fine."}], **SLOW}
        for i in range(40)
    ]
    done_times = []

    def post(body):
        r = httpx.post(f"{url}/v1/dense_rewards", json=body, timeout=120)
        done_times.append(time.monotonic())
        return r

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=40) as pool:
        futures = [pool.submit(post, b) for b in bodies]
        # Kill once the run is clearly under way (first answers back), at a moment the victim is computing
        # (its CPU time advances), so it dies mid-task rather than between tasks.
        while not done_times and time.monotonic() - started < 30:
            time.sleep(0.05)
        victim = cluster["workers"][0]
        while not _busy(victim.pid) and time.monotonic() - started < 60:
            pass
        os.kill(victim.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        responses = [f.result() for f in futures]
    finished = time.monotonic()
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200][:2]
    results = [r.json()["results"] for r in responses]
    assert [len(x) for x in results] == [1] * 40
    assert sorted(x[0]["id"] for x in results) == sorted(f"r{i}" for i in range(40))
    for body, got in zip(bodies, results):
        _same(got[0], _reference(engine, body)[0])
    text = httpx.get(f"{url}/metrics").text
    redeliveries = metric(text, "tokencredit_task_redeliveries")
    print(f"\nkill test: killed after {killed_at - started:.2f} s, all 40 answered after {finished - started:.2f} s "
          f"({finished - killed_at:.2f} s after the kill), {redeliveries:.0f} task(s) redelivered")
    # The victim was mid-task when killed (tasks are ~0.3 s of RM work, the run ~4 s): its task came back.
    assert redeliveries >= 1
