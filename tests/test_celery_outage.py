"""Back-pressure, deadlines and a Redis restart, on a redis-server this module starts (and breaks) itself.

One API process (queue limit 2 items) and, from the middle of the module on, one worker. Order matters and is
kept inside one test per phase: with no worker yet, a request sits in the queue, so the queue limit and the
deadline can be hit deterministically.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from tests.support import (
    free_port, metric, spawn_api, spawn_worker, start_redis, stop, unique_names, wait_ready, wait_worker_loaded,
)

ITEM = {"prompt": "Tell me about the movie.", "response": "The movie was wonderful and the acting was superb."}
CHEAP = {"sparse": 0.5, "loo": 0.5}


@pytest.fixture(scope="module")
def setup(encoder_rm_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("outage")
    port = free_port()
    redis_proc = start_redis(port)
    broker = f"redis://127.0.0.1:{port}/0"
    settings = dict(unique_names("outage"), max_queued_items=2, cache_ttl_s=0)
    api, url = spawn_api(encoder_rm_dir, logs / "api.log", broker, **settings)
    state = {"redis": redis_proc, "port": port, "broker": broker, "url": url, "settings": settings, "logs": logs,
             "worker": None}
    try:
        wait_ready(api, url, logs / "api.log")
        yield state
    finally:
        stop(api, state["worker"], state["redis"])


def test_queue_limit_and_deadline_without_workers(setup):
    url = setup["url"]
    waiting = {}

    def slow_request():
        body = {"items": [ITEM], "weights": CHEAP, "deadline_ms": 1500}
        waiting["response"] = httpx.post(f"{url}/v1/dense_rewards", json=body, timeout=30)

    t = threading.Thread(target=slow_request)
    t.start()
    time.sleep(0.5)  # the first request's item is queued (no worker consumes)
    over = httpx.post(f"{url}/v1/dense_rewards", json={"items": [ITEM, ITEM], "weights": CHEAP}, timeout=30)
    assert over.status_code == 429, over.text
    assert int(over.headers["Retry-After"]) >= 1 and over.json()["error"]["code"] == "overloaded"
    t.join(timeout=30)
    r = waiting["response"]
    assert r.status_code == 200, r.text
    item = r.json()["results"][0]
    assert item["token_rewards"] is None and item["score"] is None  # never a silent 0
    assert item["error"]["code"] == "deadline_exceeded" and item["error"]["retryable"] is True
    text = httpx.get(f"{url}/metrics").text
    assert metric(text, "tokencredit_worker_failures_total") >= 1
    assert 'status="429"' in text


def _start_worker(setup, encoder_rm_dir):
    log = setup["logs"] / "worker.log"
    setup["worker"] = spawn_worker(encoder_rm_dir, log, setup["broker"], "outage@test", **setup["settings"])
    wait_worker_loaded(setup["worker"], log)


def _ok(url, timeout=10.0):
    r = httpx.post(f"{url}/v1/dense_rewards", json={"items": [ITEM], "weights": CHEAP}, timeout=timeout)
    return r


def test_redis_restart(setup, encoder_rm_dir):
    url = setup["url"]
    _start_worker(setup, encoder_rm_dir)
    r = _ok(url, timeout=60)
    assert r.status_code == 200 and r.json()["results"][0]["error"] is None, r.text

    log = []  # (sent, answered, status, retry_after)
    stop_flag = threading.Event()

    def hammer():
        while not stop_flag.is_set():
            sent = time.monotonic()
            try:
                resp = _ok(url, timeout=20)
                status, retry = resp.status_code, resp.headers.get("Retry-After")
                if status == 200 and resp.json()["results"][0]["error"] is not None:
                    status = "item_error"
            except httpx.HTTPError as exc:
                status, retry = type(exc).__name__, None
            log.append((sent, time.monotonic(), status, retry))
            time.sleep(0.05)

    thread = threading.Thread(target=hammer)
    thread.start()
    time.sleep(1.0)
    down_at = time.monotonic()
    setup["redis"].kill()
    setup["redis"].wait(timeout=10)
    time.sleep(2.0)
    up_at = time.monotonic()
    setup["redis"] = start_redis(setup["port"])
    # Recovered: a 200 sent after the restart.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(s == 200 and t0 > up_at for t0, _, s, _ in log):
        time.sleep(0.1)
    time.sleep(1.0)
    stop_flag.set()
    thread.join(timeout=30)

    recovered = min(t1 for t0, t1, s, _ in log if s == 200 and t0 > up_at)
    print(f"\nredis restart: down {up_at - down_at:.1f} s, first 200 {recovered - up_at:.2f} s after it was back; "
          f"{sum(1 for *_, s, _ in log if s == 503)} answers 503")
    for sent, answered, status, retry in log:
        assert answered - sent < 15, "a request hung"
        if status != 200:
            assert status == 503 and retry is not None, (status, sent - down_at)
            # 503s only in the gap (a request sent just before the kill may be answered 503 as it fails).
            assert down_at - 2.0 <= sent <= recovered, (sent - down_at, recovered - down_at)
    assert any(s == 503 for *_, s, _ in log), "no request was sent during the outage"
    after = [s for t0, _, s, _ in log if t0 > recovered]
    assert after and all(s == 200 for s in after), after
    assert recovered - up_at < 20
