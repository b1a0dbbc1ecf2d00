"""A training cluster's load on one embedded server, over loopback with the tiny RM: 1,000 concurrent single-sample
requests all answered once, memory back near its start; 429 only past the queue's high mark; a client that
disconnects while queued is never computed. No timing assertions: orderings are checked through /metrics."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from urllib.parse import urlsplit

import httpx
import pytest

from bench.http_burst import burst
from tests.support import metric, spawn_server, stop, wait_ready

PROMPT = "Tell me about the movie."
WORDS = ["wonderful", "awful", "superb", "boring", "great", "bad", "long", "fun"]
# Seconds of RM work on the tiny RM: something that is still running while the test does its part.
SLOW = {"items": [{"id": "slow", "prompt": PROMPT, "response": " ".join(["the movie was wonderful"] * 10)}],
        "weights": {"lime": 1}, "methods": {"lime": {"num_samples": 6000}}}


def _response(i: int) -> str:
    return f"The movie was {WORDS[i % 8]} and {WORDS[(i // 8) % 8]}, number {i}."


def _rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _metrics(url: str) -> str:
    return httpx.get(f"{url}/metrics", timeout=30).text


def _wait(condition, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def engine(encoder_rm_dir):
    """The engine in this process, as the server loads it: the reference scores."""
    from service.config import Settings
    from workers.loader import load_engine

    return load_engine(Settings(model=str(encoder_rm_dir), warmup=False))


def _start(encoder_rm_dir, tmp_path, **settings):
    log = tmp_path / "server.log"
    proc, url = spawn_server(encoder_rm_dir, log, **settings)
    wait_ready(proc, url, log)
    return proc, url


def _requests(n: int, tag: str):
    """Half OpenRLHF's one-sample call, half one-item dense requests with an id; each text distinct."""
    out = []
    for i in range(n):
        response = f"{_response(i)} ({tag})"
        if i % 2 == 0:
            out.append(("/openrlhf/get_reward", {"query": [f"{PROMPT} {response}"], "prompts": [PROMPT], "labels": [None]}))
        else:
            out.append(("/v1/dense_rewards", {"items": [{"id": f"{tag}-{i}", "prompt": PROMPT, "response": response}],
                                              "weights": {"sparse": 0.5, "attention": 0.5}}))
    return out


def test_a_thousand_concurrent_single_sample_requests(encoder_rm_dir, tmp_path, engine):
    from tokencredit.types import DenseRewardsRequest

    proc, url = _start(encoder_rm_dir, tmp_path)
    host, port = urlsplit(url).hostname, urlsplit(url).port
    try:
        warm, _ = asyncio.run(burst(host, port, _requests(100, "warm")))
        assert all(a.status == 200 for a in warm)
        start_mb = _rss_mb(proc.pid)
        peaks, after_round = [], []
        for round_ in range(2):
            tag = f"r{round_}"
            requests = _requests(1000, tag)
            sampler_done = threading.Event()

            def sample():
                while not sampler_done.wait(0.05):
                    peaks.append(_rss_mb(proc.pid))

            sampler = threading.Thread(target=sample)
            sampler.start()
            try:
                answers, _ = asyncio.run(burst(host, port, requests))
            finally:
                sampler_done.set()
                sampler.join()
            bad = [(a.status, a.error, a.body) for a in answers if a.status != 200]
            assert not bad, (len(bad), bad[:3])
            ids = []
            for (path, body), answer in zip(requests, answers):
                if path == "/v1/dense_rewards":
                    [result] = answer.body["results"]
                    assert result["error"] is None and result["score"] is not None
                    ids.append(result["id"])
                else:
                    # Each answer is its own query's score (batched with others: fp32 rounding only).
                    [score] = answer.body["rewards"]
                    prompt, query = body["prompts"][0], body["query"][0]
                    request = DenseRewardsRequest.model_validate(
                        {"items": [{"prompt": prompt, "response": query[len(prompt):]}], "weights": {"sparse": 1}})
                    want = engine.run(request, request.weights).results[0].score
                    assert score == pytest.approx(want, rel=1e-4, abs=1e-5)
            assert sorted(ids) == sorted(body["items"][0]["id"] for path, body in requests if path == "/v1/dense_rewards")
            assert len(set(ids)) == len(ids) == 500
            after_round.append(_rss_mb(proc.pid))
        _wait(lambda: metric(_metrics(url), "tokencredit_queue_depth") == 0, "an empty queue")
        end_mb = _rss_mb(proc.pid)
        print(f"\nload: RSS {start_mb:.0f} MB before, peak {max(peaks):.0f} MB, after each burst of 1,000 "
              f"{', '.join(f'{m:.0f}' for m in after_round)} MB, {end_mb:.0f} MB at the end")
        # Generous: the allocator keeps some of the first burst's peak; what the second burst adds is a leak.
        assert end_mb - start_mb < 150, (start_mb, max(peaks), end_mb)
        assert after_round[1] - after_round[0] < 30, after_round
    finally:
        stop(proc)


def test_429_only_past_the_high_mark_with_retry_after(encoder_rm_dir, tmp_path):
    proc, url = _start(encoder_rm_dir, tmp_path, max_queued_items=4)
    host, port = urlsplit(url).hostname, urlsplit(url).port
    try:
        before = metric(_metrics(url), "tokencredit_batch_items_count")
        slow = threading.Thread(target=lambda: httpx.post(f"{url}/v1/dense_rewards", json=SLOW, timeout=300))
        slow.start()
        _wait(lambda: metric(_metrics(url), "tokencredit_batch_items_count") > before, "the slow request to start")
        answers, _ = asyncio.run(burst(host, port, _requests(6, "mark")))
        slow.join(timeout=300)
        statuses = sorted(a.status for a in answers)
        # The slow request holds 1 of the 4 places: 3 are queued (and answered after it), 3 refused. (Had it
        # finished before the burst, 4 would be queued.)
        assert statuses == [200, 200, 200, 429, 429, 429], statuses
        for a in answers:
            if a.status == 429:
                assert int(a.headers["retry-after"]) >= 1 and a.body["error"]["code"] == "overloaded"
    finally:
        stop(proc)


def test_a_client_that_disconnects_while_queued_is_never_computed(encoder_rm_dir, tmp_path):
    proc, url = _start(encoder_rm_dir, tmp_path)
    host, port = urlsplit(url).hostname, urlsplit(url).port
    try:
        text = _metrics(url)
        items_before = metric(text, "tokencredit_batch_items_sum")
        batches_before = metric(text, "tokencredit_batch_items_count")
        slow = threading.Thread(target=lambda: httpx.post(f"{url}/v1/dense_rewards", json=SLOW, timeout=300))
        slow.start()
        _wait(lambda: metric(_metrics(url), "tokencredit_batch_items_count") > batches_before, "the slow request to start")
        body = (b'{"items": [{"id": "victim", "prompt": "Tell me.", "response": "Never computed, I hope."}], '
                b'"weights": {"sparse": 1}}')
        victim = socket.create_connection((host, port))
        victim.sendall(b"POST /v1/dense_rewards HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        _wait(lambda: metric(_metrics(url), "tokencredit_queue_depth") == 2, "the victim to be queued")
        victim.close()
        _wait(lambda: 'tokencredit_dropped_items_total{reason="client_gone"} 1.0' in _metrics(url), "the drop")
        slow_running = slow.is_alive()
        slow.join(timeout=300)
        assert slow_running, "the slow request finished before the victim left; make it slower"
        _wait(lambda: metric(_metrics(url), "tokencredit_queue_depth") == 0, "an empty queue")
        text = _metrics(url)
        # Only the slow request's item reached the engine.
        assert metric(text, "tokencredit_batch_items_sum") == items_before + 1
        assert 'endpoint="/v1/dense_rewards",method="POST",status="499"' in text
    finally:
        stop(proc)
