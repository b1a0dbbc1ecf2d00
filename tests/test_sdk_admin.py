"""`AdminClient` and `AsyncAdminClient` against a real server (tiny encoder RM, admin token) on loopback: typed errors,
ETags, the read-modify-write loop under contention, timeouts, and the token kept out of every message.

Runs in the SDK's torch-free venv too (`tests/test_sdk_alone.py`): nothing here imports torch or the server.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import uuid

import pytest

from tests.support import free_port, running_server
from tokencredit import Timeouts
from tokencredit.admin import AdminClient, AsyncAdminClient
from tokencredit.errors import (
    AuthError,
    ConnectError,
    InvalidRequestError,
    PreconditionFailedError,
    PreconditionRequiredError,
    RequestTimeout,
    error_from_response,
)

TOKEN = "tc-admin-" + uuid.uuid4().hex
ALL = ("sparse", "attention", "shap", "lime", "loo", "prefix")
FULL = lambda w: {c: float(w.get(c, 0.0)) for c in ALL}  # noqa: E731


@pytest.fixture(scope="module")
def server(encoder_rm_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("sdk-admin") / "server.log"
    with running_server(encoder_rm_dir, log, secret=TOKEN, admin_token=TOKEN, state_db=log.with_suffix(".sqlite3"),
                        weights=json.dumps({"sparse": 1.0})) as url:
        yield {"url": url}


def test_admin_client_errors(server, monkeypatch):
    url = server["url"]
    with AdminClient(url, token="wrong") as wrong:
        with pytest.raises(AuthError) as err:
            wrong.get_shaping()
        assert err.value.status == 401 and not err.value.retryable
    monkeypatch.setenv("TOKENCREDIT_ADMIN_TOKEN", TOKEN)  # the default token
    with AdminClient(url) as admin:
        assert TOKEN not in repr(admin)
        current = admin.get_shaping()
        assert current.etag == f'"v{current.version}"'
        with pytest.raises(PreconditionRequiredError) as err:
            admin.put_shaping({"sparse": 1.0}, if_match=None)
        assert err.value.status == 428 and err.value.field == "If-Match"
        with pytest.raises(PreconditionFailedError) as err:
            admin.put_shaping({"sparse": 1.0}, if_match=current.version + 5)
        assert err.value.status == 412 and err.value.current_version == current.version
        with pytest.raises(InvalidRequestError) as err:
            admin.put_shaping({"sparse": 1.5}, if_match=current.etag)
        assert err.value.status == 422 and err.value.field == "weights.sparse"
        with pytest.raises(ValueError, match="simplex"):  # checked before any I/O
            admin.update_shaping({"sparse": 0.5})
        assert admin.get_shaping() == current
    with pytest.raises(ConnectError):
        AdminClient(f"http://127.0.0.1:{free_port()}", token=TOKEN, timeout=2).get_shaping()
    body = {"error": {"code": "admin_disabled", "message": "the admin API is disabled"}}
    assert isinstance(error_from_response(403, body), AuthError)


def test_admin_client_read_timeout_is_typed():
    """The admin client has the dense client's timeouts: a server that accepts and never answers is a RequestTimeout."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        with AdminClient(url, token=TOKEN, timeout=Timeouts(connect=5, read=0.2, write=5, pool=5)) as admin:
            with pytest.raises(RequestTimeout) as err:
                admin.get_shaping()
    assert err.value.retryable and TOKEN not in str(err.value)


class _RacedAdmin(AdminClient):
    """Another writer gets in between this client's first GET and its PUT (deterministically)."""

    def __init__(self, *args, rival: AdminClient, **kwargs):
        super().__init__(*args, **kwargs)
        self.rival, self.raced = rival, False

    def _get_shaping_flow(self):
        current = yield from super()._get_shaping_flow()
        if not self.raced:
            self.raced = True
            self.rival.put_shaping({"attention": 1.0}, if_match=current.version, updated_by="rival")
        return current


def test_update_shaping_retries_a_stale_etag(server):
    with AdminClient(server["url"], token=TOKEN) as rival, _RacedAdmin(server["url"], token=TOKEN, rival=rival) as admin:
        before = rival.get_shaping().version
        record = admin.update_shaping({"shap": 0.5, "lime": 0.5}, updated_by="raced")
        assert admin.stale_retries == 1 and record.version == before + 2  # the rival's version, then ours
        history = {v.version: v for v in admin.history()}
        assert history[before + 1].updated_by == "rival" and history[before + 2].weights == FULL({"shap": 0.5, "lime": 0.5})


def test_two_controllers_never_lose_an_update(server):
    url, per_writer, tag = server["url"], 12, uuid.uuid4().hex[:6]
    results = {0: [], 1: []}
    barrier = threading.Barrier(2)
    clients = [AdminClient(url, token=TOKEN), AdminClient(url, token=TOKEN)]

    def controller(j):
        for i in range(per_writer):
            barrier.wait()  # both push at the same moment, every round
            a, b = ("sparse", "loo") if j == 0 else ("shap", "lime")
            w = {a: (i + 1) / 100, b: 1 - (i + 1) / 100}
            results[j].append((clients[j].update_shaping(w, updated_by=f"{tag}-{j}-{i}"), w))

    threads = [threading.Thread(target=controller, args=(j,)) for j in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    pushed = results[0] + results[1]
    versions = [record.version for record, _ in pushed]
    assert len(versions) == 2 * per_writer and len(set(versions)) == 2 * per_writer
    history = {v.version: v for v in clients[0].history()}
    ours = {v.updated_by: v for v in history.values() if (v.updated_by or "").startswith(tag)}
    assert len(ours) == 2 * per_writer  # every update is its own version: none overwritten, none lost
    for record, w in pushed:
        assert history[record.version].weights == FULL(w) and history[record.version].updated_by == record.updated_by
    print(f"\n412s absorbed: {clients[0].stale_retries} + {clients[1].stale_retries}")
    for c in clients:
        c.close()


def test_async_admin_client_is_the_same_core(server):
    """The async face: the same answers, errors and read-modify-write loop; 8 concurrent writers lose nothing."""
    tag = uuid.uuid4().hex[:6]

    async def main():
        async with AsyncAdminClient(server["url"], token=TOKEN) as admin, \
                AsyncAdminClient(server["url"], token="wrong") as wrong:
            with pytest.raises(AuthError):
                await wrong.get_shaping()
            current = await admin.get_shaping()
            with pytest.raises(PreconditionFailedError) as err:
                await admin.put_shaping({"sparse": 1.0}, if_match=current.version + 5)
            assert err.value.current_version == current.version
            weights = [{"sparse": k / 10, "loo": 1 - k / 10} for k in range(8)]
            records = await asyncio.gather(*(admin.update_shaping(w, updated_by=f"{tag}-{k}") for k, w in enumerate(weights)))
            return current, records, await admin.history(), admin.stale_retries

    current, records, history, stale = asyncio.run(main())
    assert sorted(r.version for r in records) == list(range(current.version + 1, current.version + 9))
    by_version = {v.version: v for v in history}
    for k, r in enumerate(records):
        assert by_version[r.version].updated_by == f"{tag}-{k}" and by_version[r.version].weights == FULL(r.weights)
        assert r.weights == FULL({"sparse": k / 10, "loo": 1 - k / 10})
    assert stale >= 1  # 8 writers on one version: most of them lost at least one round and retried
    with AdminClient(server["url"], token=TOKEN) as sync:
        assert sync.history() == history
