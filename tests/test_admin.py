"""Admin API for shaping weights: a real server on loopback (tiny encoder RM), plus the SQLite and Redis stores directly."""

from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest

from service.shaping_store import Deployment, RedisShapingStore, SqliteShapingStore, StaleVersion
from tests.support import DEFAULT_REDIS, cleanup_redis, require_default_redis, spawn_server, stop, unique_names, wait_ready
from tokencredit.types import ShapingWeights

TOKEN = "tc-admin-" + uuid.uuid4().hex  # distinctive, so a grep of the log finds any leak
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ITEM = {"prompt": "Tell me about the movie.", "response": "The movie was wonderful."}
# Cheap components only (no shap/lime: no numba JIT, few RM rows).
INITIAL = {"sparse": 0.5, "attention": 0.5}
FULL = lambda w: {c: float(w.get(c, 0.0)) for c in ("sparse", "attention", "shap", "lime", "loo", "prefix")}  # noqa: E731
# Stores are keyed by deployment; these tests use one (the two-server scoping tests are in test_deployments.py).
DEPLOYMENT = Deployment(None, "tiny-rm", "0123456789ab")


@pytest.fixture(scope="module")
def env(encoder_rm_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("admin")
    settings = {"admin_token": TOKEN, "state_db": tmp / "state" / "shaping.sqlite3", "weights": json.dumps(INITIAL)}
    admin = spawn_server(encoder_rm_dir, tmp / "admin.log", **settings)
    closed = spawn_server(encoder_rm_dir, tmp / "closed.log", state_db=tmp / "closed.sqlite3", weights=settings["weights"])
    procs = {"admin": admin[0], "closed": closed[0]}
    state = {"tmp": tmp, "settings": settings, "procs": procs, "urls": {"admin": admin[1], "closed": closed[1]}}
    try:
        wait_ready(admin[0], admin[1], tmp / "admin.log")
        wait_ready(closed[0], closed[1], tmp / "closed.log")
        yield state
    finally:
        stop(*state["procs"].values())


def _url(env, name="admin"):
    return env["urls"][name]


def _dense(url, **extra):
    r = httpx.post(f"{url}/v1/dense_rewards", json={"items": [ITEM], **extra}, timeout=60)
    return r


def _get(url, headers=AUTH):
    return httpx.get(f"{url}/admin/v1/shaping", headers=headers, timeout=10)


def _put(url, weights, if_match=None, updated_by="test"):
    headers = dict(AUTH, **({"If-Match": if_match} if if_match is not None else {}))
    return httpx.put(f"{url}/admin/v1/shaping", headers=headers, json={"weights": weights, "updated_by": updated_by}, timeout=10)


def _error(r, status):
    assert r.status_code == status, r.text
    return r.json()["error"]


def _deployment(url):
    """What the server's answers must name: `rm@revision` of the RM it serves (no deployment name configured)."""
    model = httpx.get(f"{url}/v1/info", timeout=10).json()["model"]
    return f"{model['name']}@{model['revision']}"


# ---------------------------------------------------------------------------------------------------- auth
def test_no_configured_token_is_403(env):
    url = _url(env, "closed")
    err = _error(_get(url, AUTH), 403)
    assert err["code"] == "admin_disabled" and "TOKENCREDIT_ADMIN_TOKEN" in err["message"] and TOKEN not in err["message"]
    # Without credentials it is 401 as on any server (what the schema says), and the message still says why.
    r = _get(url, {})
    err = _error(r, 401)
    assert r.headers["WWW-Authenticate"] == "Bearer" and "TOKENCREDIT_ADMIN_TOKEN" in err["message"]


def test_wrong_or_missing_token_is_401(env):
    url = _url(env)
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Basic {TOKEN}"}):
        r = _get(url, headers)
        _error(r, 401)
        assert r.headers["WWW-Authenticate"] == "Bearer" and TOKEN not in r.text
    assert _error(httpx.get(f"{url}/admin/v1/shaping/history", timeout=10), 401)


# ---------------------------------------------------------------------------------------------------- versions
def test_get_put_and_dense_rewards_follow(env):
    url = _url(env)
    r = _get(url)
    assert r.status_code == 200 and r.headers["ETag"] == '"v1"'
    body = r.json()
    deployment = _deployment(url)
    assert body["version"] == 1 and body["weights"] == FULL(INITIAL) and body["updated_at"] and "updated_by" in body
    assert body["deployment"] == deployment
    assert _dense(url).json()["shaping"] == {"version": 1, "weights": FULL(INITIAL), "deployment": deployment}

    assert _error(_put(url, {"sparse": 1.0}), 428)["field"] == "If-Match"
    assert _error(_put(url, {"sparse": 1.0}, '"v7"'), 412)["field"] == "If-Match"
    # Off the simplex: the faulty component is named; nothing is written.
    err = _error(_put(url, {"sparse": 1.5}, '"v1"'), 422)
    assert err["field"] == "weights.sparse" and err["code"] == "invalid_request"
    assert _error(_put(url, {"sparse": 0.5, "bogus": 0.5}, '"v1"'), 422)["field"] == "weights.bogus"
    err = _error(_put(url, {"sparse": 0.5, "attention": 0.2}, '"v1"'), 422)
    assert err["field"] == "weights" and "simplex" in err["message"]
    # A component this encoder RM cannot compute: named, nothing written.
    err = _error(_put(url, {"sparse": 0.5, "prefix": 0.5}, '"v1"'), 422)
    assert err["field"] == "weights.prefix" and "cannot compute the prefix component" in err["message"]
    assert _get(url).json()["version"] == 1

    r = _put(url, {"sparse": 1.0}, '"v1"', updated_by="alice")
    assert r.status_code == 200, r.text
    assert r.headers["ETag"] == '"v2"' and r.json()["version"] == 2 and r.json()["updated_by"] == "alice"
    assert r.json()["deployment"] == deployment
    out = _dense(url).json()
    assert out["shaping"] == {"version": 2, "weights": FULL({"sparse": 1.0}), "deployment": deployment}
    # sparse only: all the reward on the last token.
    rewards = out["results"][0]["token_rewards"]
    assert all(x == 0.0 for x in rewards[:-1]) and rewards[-1] != 0.0
    assert _error(_put(url, {"sparse": 0.5, "attention": 0.5}, '"v1"'), 412)  # stale now
    assert httpx.get(f"{url}/v1/info", timeout=10).json()["shaping"] == out["shaping"]
    # A request's own weights: no version, the same deployment.
    own = _dense(url, weights={"attention": 1.0}).json()["shaping"]
    assert own == {"version": None, "weights": FULL({"attention": 1.0}), "deployment": deployment}


def test_pin_old_version(env):
    url = _url(env)
    out = _dense(url, shaping_version=1).json()
    assert out["shaping"] == {"version": 1, "weights": FULL(INITIAL), "deployment": _deployment(url)}
    assert out["results"][0]["token_rewards"][0] != 0.0  # attention spreads reward, unlike v2's sparse
    err = _error(_dense(url, shaping_version=99), 422)
    assert err["field"] == "shaping_version"
    assert _error(_dense(url, shaping_version=1, weights={"sparse": 1.0}), 422)["field"] == "shaping_version"


def test_concurrent_writers_exactly_one_wins(env):
    url = _url(env)
    etag = _get(url).headers["ETag"]
    statuses, barrier = [], threading.Barrier(4)

    def writer(i):
        barrier.wait()
        statuses.append(_put(url, {"sparse": 0.1 * (i + 1), "attention": 1 - 0.1 * (i + 1)}, etag, f"writer-{i}").status_code)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(statuses) == [200, 412, 412, 412]


def test_history_and_restart_keep_versions(env, encoder_rm_dir):
    url = _url(env)
    answer = httpx.get(f"{url}/admin/v1/shaping/history", headers=AUTH, timeout=10).json()
    history = answer["versions"]
    assert [v["version"] for v in history] == [1, 2, 3]
    assert answer["deployment"] == _deployment(url) and {v["deployment"] for v in history} == {answer["deployment"]}
    assert history[1]["updated_by"] == "alice" and history[2]["updated_by"].startswith("writer-")
    assert all(v["updated_at"] for v in history)
    current = _get(url).json()

    stop(env["procs"]["admin"])
    proc, url2 = spawn_server(encoder_rm_dir, env["tmp"] / "admin.log", **env["settings"])
    env["procs"]["admin"], env["urls"]["admin"] = proc, url2
    wait_ready(proc, url2, env["tmp"] / "admin.log")
    r = _get(url2)
    assert r.headers["ETag"] == '"v3"' and r.json() == current
    assert httpx.get(f"{url2}/admin/v1/shaping/history", headers=AUTH, timeout=10).json()["versions"] == history
    assert _dense(url2).json()["shaping"]["version"] == 3


def test_sdk_pins_a_version(env):
    """`Client.dense_rewards(shaping_version=...)` (what a BO trial does with $TOKENCREDIT_SHAPING_VERSION)."""
    from tokencredit import Client

    url = _url(env)
    assert _put(url, {"sparse": 1.0}, _get(url).headers["ETag"], updated_by="sdk-pin").status_code == 200
    with Client(url) as client:
        pinned = client.dense_rewards([ITEM], shaping_version=1)[0]
        current = client.dense_rewards([ITEM])[0]
        with pytest.raises(ValueError, match="not both"):
            client.dense_rewards([ITEM], shaping_version=1, weights={"sparse": 1.0})
    assert pinned.token_rewards == pytest.approx(_dense(url, shaping_version=1).json()["results"][0]["token_rewards"])
    assert pinned.token_rewards[0] != 0.0  # v1 spreads reward over attention
    assert all(x == 0.0 for x in current.token_rewards[:-1])  # the current version is sparse only


def test_token_never_logged(env):
    # The servers log at info level (startup, readiness, both runs of the admin server); the token is nowhere.
    text = (env["tmp"] / "admin.log").read_text(errors="replace")
    assert text.count("ready in") == 2 and TOKEN not in text
    assert TOKEN not in (env["tmp"] / "closed.log").read_text(errors="replace")


# ---------------------------------------------------------------------------------------------------- stores
def _store_contract(store):
    first = store.current()
    assert first.version == 1 and first.weights == FULL(INITIAL)
    with pytest.raises(StaleVersion):
        store.put(ShapingWeights(sparse=1.0), 5, "x")
    results, barrier = [], threading.Barrier(6)

    def writer(i):
        barrier.wait()
        try:
            results.append(store.put(ShapingWeights(sparse=1.0), 1, f"w{i}").version)
        except StaleVersion as exc:
            results.append(("stale", exc.current))

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(2) == 1 and results.count(("stale", 2)) == 5  # exactly one compare-and-set wins
    assert store.current().version == 2 and store.get(1).weights == FULL(INITIAL) and store.get(9) is None
    assert [r.version for r in store.history()] == [1, 2]


def test_sqlite_store(tmp_path):
    path = tmp_path / "s.sqlite3"
    _store_contract(SqliteShapingStore(path, ShapingWeights(**INITIAL), DEPLOYMENT))
    again = SqliteShapingStore(path, ShapingWeights(sparse=1.0), DEPLOYMENT)  # a restart: stored versions win over settings
    assert again.current().version == 2 and [r.version for r in again.history()] == [1, 2]


def test_redis_store():
    require_default_redis()
    import redis

    prefix = f"tc-test-admin-{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(DEFAULT_REDIS)
    try:
        _store_contract(RedisShapingStore(DEFAULT_REDIS, prefix, ShapingWeights(**INITIAL), DEPLOYMENT))
        again = RedisShapingStore(DEFAULT_REDIS, prefix, ShapingWeights(sparse=1.0), DEPLOYMENT)
        assert again.current().version == 2 and [r.version for r in again.history()] == [1, 2]
    finally:
        keys = list(client.scan_iter(f"{prefix}:*"))
        if keys:
            client.delete(*keys)
        client.close()


def test_broker_mode_uses_redis(encoder_rm_dir):
    """With a broker, the app's versions live in Redis: a second app (another replica of the deployment) sees a PUT
    at once. Before its RM is loaded an app does not know its deployment, so the admin API answers 503."""
    require_default_redis()
    from fastapi.testclient import TestClient

    from service.config import Settings
    from service.main import create_app

    names = unique_names("admin")
    settings = Settings(broker_url=DEFAULT_REDIS, **names, admin_token=TOKEN, weights=json.dumps(INITIAL),
                        model=str(encoder_rm_dir), warmup=False)
    try:
        with TestClient(create_app(settings, load_model=False)) as unloaded:
            err = _error(unloaded.get("/admin/v1/shaping", headers=AUTH), 503)
            assert err["code"] == "not_ready" and err["retryable"]
        with TestClient(create_app(settings)) as a, TestClient(create_app(settings)) as b:
            for client in (a, b):
                deadline = time.monotonic() + 60
                while client.get("/readyz").status_code != 200:  # the weightless validator loads in the background
                    assert time.monotonic() < deadline, "validator not loaded"
                    time.sleep(0.1)
            r = a.get("/admin/v1/shaping", headers=AUTH)
            assert r.headers["ETag"] == '"v1"' and r.json()["deployment"].startswith(Path(encoder_rm_dir).name + "@")
            assert a.put("/admin/v1/shaping", headers=dict(AUTH, **{"If-Match": '"v1"'}), json={"weights": {"loo": 1.0}}).status_code == 200
            assert b.get("/admin/v1/shaping", headers=AUTH).json()["weights"] == FULL({"loo": 1.0})
            assert b.get("/v1/info").json()["shaping"]["version"] == 2
    finally:
        cleanup_redis(DEFAULT_REDIS, names)


def test_store_says_when_it_overrides_the_configured_weights(tmp_path, caplog):
    import logging

    from service.shaping_store import SqliteShapingStore
    from tokencredit.types import ShapingWeights

    path = tmp_path / "state.sqlite3"
    with caplog.at_level(logging.WARNING, logger="tokencredit.shaping"):
        assert SqliteShapingStore(path, ShapingWeights(sparse=1.0), DEPLOYMENT).current().version == 1
        assert not caplog.records  # an empty store simply takes the configured weights
        restarted = SqliteShapingStore(path, ShapingWeights(shap=1.0), DEPLOYMENT)
        assert restarted.current().shaping_weights().sparse == 1.0  # durable: the stored version wins
    assert any("TOKENCREDIT_WEIGHTS" in r.getMessage() for r in caplog.records)
