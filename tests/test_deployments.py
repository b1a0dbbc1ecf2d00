"""Shaping state belongs to one deployment: real servers on one machine sharing one state file (embedded) or one
Redis database (broker mode) keep separate histories unless they serve the same RM under the same deployment name,
and then each serves the other's updates from its next request on. Plus the one-time migration of the history
written before deployments existed (a state file or Redis keys keyed by nothing)."""

from __future__ import annotations

import json
import logging
import sqlite3
import uuid

import httpx
import pytest

from service.shaping_store import Deployment, RedisShapingStore, SqliteShapingStore
from tests.support import (
    DEFAULT_REDIS, cleanup_redis, require_default_redis, spawn_api, spawn_server, stop, unique_names, wait_ready,
)
from tokencredit.types import ShapingWeights

TOKEN = "tc-admin-" + uuid.uuid4().hex
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ITEM = {"prompt": "Tell me about the movie.", "response": "The movie was wonderful."}
INITIAL = {"sparse": 0.5, "attention": 0.5}  # cheap, deterministic components (no sampling)
FULL = lambda w: {c: float(w.get(c, 0.0)) for c in ("sparse", "attention", "shap", "lime", "loo", "prefix")}  # noqa: E731


def _info(url):
    r = httpx.get(f"{url}/v1/info", timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def _get(url):
    r = httpx.get(f"{url}/admin/v1/shaping", headers=AUTH, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def _put(url, weights, updated_by):
    etag = httpx.get(f"{url}/admin/v1/shaping", headers=AUTH, timeout=10).headers["ETag"]
    r = httpx.put(f"{url}/admin/v1/shaping", headers=dict(AUTH, **{"If-Match": etag}),
                  json={"weights": weights, "updated_by": updated_by}, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def _dense(url):
    r = httpx.post(f"{url}/v1/dense_rewards", json={"items": [ITEM]}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


class Servers:
    """Named servers of one test on one machine, all on one state file (embedded) or one Redis database (broker)."""

    def __init__(self, tmp, spawn):
        self.tmp, self.spawn = tmp, spawn
        self.procs, self.urls, self.args = {}, {}, {}

    def start(self, **servers):
        """name=(model_dir, deployment name or None); started together, then waited for."""
        for name, (model_dir, deployment) in servers.items():
            self.args[name] = (model_dir, deployment)
            self.procs[name], self.urls[name] = self.spawn(model_dir, self.tmp / f"{name}.log", deployment)
        for name in servers:
            wait_ready(self.procs[name], self.urls[name], self.tmp / f"{name}.log")

    def restart(self, name):
        stop(self.procs[name])
        self.start(**{name: self.args[name]})

    def stop_all(self):
        stop(*self.procs.values())


def _scenario(servers: Servers, encoder_rm_dir, causal_rm_dir, answers: bool):
    """The issue's scenario, then named sharing. `answers`: also compare dense-rewards answers (embedded only)."""
    servers.start(enc=(encoder_rm_dir, None), causal=(causal_rm_dir, None),
                  ab1=(encoder_rm_dir, "ab"), ab2=(encoder_rm_dir, "ab"))
    enc, causal, ab1, ab2 = (servers.urls[n] for n in ("enc", "causal", "ab1", "ab2"))
    model = _info(enc)["model"]
    rm_key = f"{model['name']}@{model['revision']}"
    assert _info(enc)["shaping"] == {"version": 1, "weights": FULL(INITIAL), "deployment": rm_key}
    assert _info(ab1)["shaping"]["deployment"] == _info(ab2)["shaping"]["deployment"] == f"ab/{rm_key}"
    causal_key = _info(causal)["shaping"]["deployment"]
    assert causal_key != rm_key and causal_key.startswith(_info(causal)["model"]["name"] + "@")
    before = _dense(enc) if answers else None

    # A PUT on the second server (another RM) leaves the first one's weights, version and answers alone.
    assert _put(causal, {"prefix": 1.0}, "causal-operator")["version"] == 2
    assert _info(causal)["shaping"] == {"version": 2, "weights": FULL({"prefix": 1.0}), "deployment": causal_key}
    for url in (enc, ab1, ab2):
        assert _info(url)["shaping"]["version"] == 1 and _info(url)["shaping"]["weights"] == FULL(INITIAL)
        assert _get(url)["version"] == 1
    if answers:
        after = _dense(enc)
        assert after["shaping"] == before["shaping"] == {"version": 1, "weights": FULL(INITIAL), "deployment": rm_key}
        assert after["results"][0]["token_rewards"] == before["results"][0]["token_rewards"]

    # Same RM, same deployment name: one history; the other server serves a PUT from its next request on.
    assert _put(ab1, {"sparse": 1.0}, "ab-operator")["version"] == 2
    assert _info(ab2)["shaping"] == {"version": 2, "weights": FULL({"sparse": 1.0}), "deployment": f"ab/{rm_key}"}
    assert _get(ab2)["updated_by"] == "ab-operator"
    if answers:
        out = _dense(ab2)
        assert out["shaping"]["version"] == 2
        rewards = out["results"][0]["token_rewards"]
        assert all(x == 0.0 for x in rewards[:-1]) and rewards[-1] != 0.0  # sparse only
    assert _put(ab2, {"attention": 1.0}, "ab-operator-2")["version"] == 3
    assert _info(ab1)["shaping"]["weights"] == FULL({"attention": 1.0})
    # ... and the unnamed server of the same RM is another deployment.
    assert _info(enc)["shaping"]["version"] == 1 and _get(enc)["weights"] == FULL(INITIAL)

    # After a restart the first server still has its own history, not the latest version of another deployment.
    servers.restart("enc")
    enc = servers.urls["enc"]
    assert _info(enc)["shaping"] == {"version": 1, "weights": FULL(INITIAL), "deployment": rm_key}
    history = httpx.get(f"{enc}/admin/v1/shaping/history", headers=AUTH, timeout=10).json()
    assert [v["version"] for v in history["versions"]] == [1] and history["deployment"] == rm_key
    if answers:
        again = _dense(enc)
        assert again["shaping"] == before["shaping"]
        assert again["results"][0]["token_rewards"] == pytest.approx(before["results"][0]["token_rewards"], rel=1e-9, abs=1e-12)


def test_embedded_servers_on_one_state_file(encoder_rm_dir, causal_rm_dir, tmp_path):
    state = tmp_path / "shaping.sqlite3"

    def spawn(model_dir, log, deployment):
        extra = {"deployment": deployment} if deployment else {}
        return spawn_server(model_dir, log, admin_token=TOKEN, state_db=state, weights=json.dumps(INITIAL), **extra)

    servers = Servers(tmp_path, spawn)
    try:
        _scenario(servers, encoder_rm_dir, causal_rm_dir, answers=True)
    finally:
        servers.stop_all()
    keys = sqlite3.connect(state).execute("SELECT DISTINCT deployment FROM shaping_history").fetchall()
    assert len(keys) == 3  # enc, causal, ab: one history each in the one file


def test_broker_api_servers_on_one_redis(encoder_rm_dir, causal_rm_dir, tmp_path):
    """Broker mode: every API server's versions live in the one Redis database (same key prefix)."""
    require_default_redis()
    names = unique_names("deploy")

    def spawn(model_dir, log, deployment):
        extra = {"deployment": deployment} if deployment else {}
        return spawn_api(model_dir, log, DEFAULT_REDIS, admin_token=TOKEN, weights=json.dumps(INITIAL), **names, **extra)

    servers = Servers(tmp_path, spawn)
    try:
        _scenario(servers, encoder_rm_dir, causal_rm_dir, answers=False)  # no workers: info and admin API only
    finally:
        servers.stop_all()
        cleanup_redis(DEFAULT_REDIS, names)


# ---------------------------------------------------------------------------------------------------- migration
ENC = Deployment(None, "enc-rm", "aaaaaaaaaaaa", components=("sparse", "attention", "shap", "lime", "loo"))
CAUSAL = Deployment(None, "causal-rm", "bbbbbbbbbbbb")
LEGACY = [{"sparse": 1.0}, {"shap": 0.5, "loo": 0.5}]  # the unscoped era's versions 1 and 2


def _legacy_file(path, versions):
    db = sqlite3.connect(path)  # the unscoped table, as earlier servers wrote it
    db.execute("CREATE TABLE shaping_versions (version INTEGER PRIMARY KEY, weights TEXT NOT NULL,"
               " updated_at TEXT NOT NULL, updated_by TEXT)")
    for i, w in enumerate(versions, 1):
        db.execute("INSERT INTO shaping_versions VALUES (?, ?, ?, ?)", (i, json.dumps(FULL(w)), f"2025-01-0{i}", f"old-{i}"))
    db.commit()
    db.close()


def _assert_migrated(first, second, caplog):
    assert first.current().version == 2 and first.current().weights == FULL(LEGACY[1])
    assert [(r.version, r.updated_by) for r in first.history()] == [(1, "old-1"), (2, "old-2")]
    assert sum("migrated 2 unscoped versions" in r.getMessage() for r in caplog.records) == 1
    # Once: the next deployment starts its own history from its settings.
    assert second.current().version == 1 and second.current().weights == FULL({"attention": 1.0})
    assert sum("migrated" in r.getMessage() for r in caplog.records) == 1


def test_sqlite_unscoped_history_moves_to_the_first_deployment_once(tmp_path, caplog):
    path = tmp_path / "state.sqlite3"
    _legacy_file(path, LEGACY)
    with caplog.at_level(logging.INFO, logger="tokencredit.shaping"):
        first = SqliteShapingStore(path, ShapingWeights(sparse=1.0), ENC)
        _assert_migrated(first, SqliteShapingStore(path, ShapingWeights(attention=1.0), CAUSAL), caplog)
        # A restart of the first deployment finds its (migrated) history, nothing to migrate again.
        assert SqliteShapingStore(path, ShapingWeights(sparse=1.0), ENC).current().version == 2
    assert sum("migrated" in r.getMessage() for r in caplog.records) == 1
    tables = {t for (t,) in sqlite3.connect(path).execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert "shaping_versions" not in tables


def test_sqlite_unscoped_history_of_a_causal_rm_is_not_given_to_an_encoder(tmp_path, caplog):
    path = tmp_path / "state.sqlite3"
    _legacy_file(path, [{"sparse": 1.0}, {"prefix": 1.0}])
    with caplog.at_level(logging.INFO, logger="tokencredit.shaping"):
        encoder = SqliteShapingStore(path, ShapingWeights(loo=1.0), ENC)
        assert encoder.current().version == 1 and encoder.current().weights == FULL({"loo": 1.0})
        assert any("not migrated" in r.getMessage() for r in caplog.records)
        causal = SqliteShapingStore(path, ShapingWeights(sparse=1.0), CAUSAL)
        assert causal.current().version == 2 and causal.current().weights == FULL({"prefix": 1.0})


def test_redis_unscoped_history_moves_to_the_first_deployment_once(caplog):
    require_default_redis()
    import redis

    prefix = f"tc-test-migrate-{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(DEFAULT_REDIS)
    try:
        for i, w in enumerate(LEGACY, 1):  # the unscoped keys, as earlier servers wrote them
            client.hset(f"{prefix}:shaping:versions", str(i),
                        json.dumps({"weights": FULL(w), "updated_at": f"2025-01-0{i}", "updated_by": f"old-{i}"}))
        client.set(f"{prefix}:shaping:current", "2")
        with caplog.at_level(logging.INFO, logger="tokencredit.shaping"):
            first = RedisShapingStore(DEFAULT_REDIS, prefix, ShapingWeights(sparse=1.0), ENC)
            _assert_migrated(first, RedisShapingStore(DEFAULT_REDIS, prefix, ShapingWeights(attention=1.0), CAUSAL), caplog)
        assert not client.exists(f"{prefix}:shaping:current", f"{prefix}:shaping:versions")
    finally:
        keys = list(client.scan_iter(f"{prefix}:*"))
        if keys:
            client.delete(*keys)
        client.close()
