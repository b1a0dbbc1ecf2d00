"""`GET /metrics` in embedded mode (the Celery mode's cache and queue metrics are checked in test_celery*.py)."""

from __future__ import annotations

import time

from fastapi.testclient import TestClient

from tests.support import metric


def test_metrics_embedded(encoder_rm_dir):
    from service.config import Settings
    from service.main import create_app

    app = create_app(Settings(model=str(encoder_rm_dir), warmup=False))
    with TestClient(app) as client:
        deadline = time.monotonic() + 60
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "embedded engine not ready"
            time.sleep(0.1)
        body = {"items": [{"prompt": "Hi.", "response": "Fine, thanks!"}] * 2, "weights": {"sparse": 0.5, "loo": 0.5}}
        ok = client.post("/v1/dense_rewards", json=body)
        assert ok.status_code == 200
        assert client.post("/v1/dense_rewards", json={"items": []}).status_code == 422
        r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert 'tokencredit_requests_total{endpoint="/v1/dense_rewards",method="POST",status="200"} 1.0' in text
    assert 'tokencredit_requests_total{endpoint="/v1/dense_rewards",method="POST",status="422"} 1.0' in text
    assert 'tokencredit_request_seconds_bucket{endpoint="/v1/dense_rewards",le="+Inf",method="POST",status="200"} 1.0' in text
    assert metric(text, "tokencredit_rm_rows_total") == ok.json()["usage"]["rm_rows"] > 0
    assert metric(text, "tokencredit_batch_items_sum") == 2
    for name in ("tokencredit_queue_depth", "tokencredit_cache_hits_total", "tokencredit_cache_misses_total",
                 "tokencredit_worker_failures_total", "tokencredit_task_redeliveries"):
        assert f"# TYPE {name.removesuffix('_total')}" in text, name
