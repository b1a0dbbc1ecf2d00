"""Durable shaping-weight versions: one interface, SQLite (embedded default) and Redis (when a broker is configured).

Versions are immutable and numbered 1, 2, ...; the current one is the highest. `put` is an atomic compare-and-set on
the current version number (SQLite: a `BEGIN IMMEDIATE` transaction; Redis: a Lua script), so two writers holding the
same ETag can never both win. An empty store starts at version 1 = the settings' initial weights. Nothing touches the
disk or Redis until the first call (rendering the OpenAPI schema builds the app without side effects).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List, Optional

from tokencredit.types import ShapingWeights

__all__ = ["ShapingRecord", "ShapingStore", "SqliteShapingStore", "RedisShapingStore", "StaleVersion", "make_store"]

log = logging.getLogger("tokencredit.shaping")


@dataclass(frozen=True)
class ShapingRecord:
    version: int
    weights: Dict[str, float]
    updated_at: str
    updated_by: Optional[str]

    def shaping_weights(self) -> ShapingWeights:
        return ShapingWeights.model_validate(self.weights)

    def as_dict(self) -> dict:
        return {"version": self.version, "weights": dict(self.weights), "updated_at": self.updated_at, "updated_by": self.updated_by}


class StaleVersion(Exception):
    """The compare-and-set lost: the current version is no longer the expected one."""

    def __init__(self, current: int):
        super().__init__(f"current version is {current}")
        self.current = current


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class ShapingStore:
    """Interface. `remote` says whether reading the current version costs a round trip (run it off the event loop)."""

    remote = False

    def __init__(self, initial: ShapingWeights):
        self.initial = initial

    def current(self) -> ShapingRecord:
        raise NotImplementedError

    def get(self, version: int) -> Optional[ShapingRecord]:
        raise NotImplementedError

    def history(self) -> List[ShapingRecord]:
        raise NotImplementedError

    def put(self, weights: ShapingWeights, expected_version: int, updated_by: Optional[str]) -> ShapingRecord:
        """Store `weights` as version expected_version + 1 if the current version is expected_version, else StaleVersion."""
        raise NotImplementedError

    def _note_existing(self, record: Optional[ShapingRecord]) -> None:
        """Once per process: say so when the durable store overrides the configured initial weights."""
        if getattr(self, "_noted", False) or record is None:
            return
        self._noted = True
        if record.shaping_weights().as_dict() != self.initial.as_dict():
            log.warning(
                "shaping version %d from the durable store is in use; the configured initial weights "
                "(TOKENCREDIT_WEIGHTS) apply only to an empty store: change weights with PUT /admin/v1/shaping",
                record.version,
            )

    def _seed(self) -> None:
        try:
            self.put(self.initial, 0, "initial settings")
        except StaleVersion:
            pass  # another process seeded it first


class SqliteShapingStore(ShapingStore):
    def __init__(self, path, initial: ShapingWeights):
        super().__init__(initial)
        self.path = Path(path).expanduser()
        self._lock = threading.Lock()
        self._ready = False
        self._current: Optional[ShapingRecord] = None

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: we issue BEGIN IMMEDIATE ourselves; one short-lived connection per call (thread safe).
        return sqlite3.connect(str(self.path), timeout=10.0, isolation_level=None)

    def _ensure(self) -> None:
        if self._ready:
            return
        with self._lock:
            if self._ready:
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = self._connect()
            try:
                db.execute(
                    "CREATE TABLE IF NOT EXISTS shaping_versions (version INTEGER PRIMARY KEY, weights TEXT NOT NULL,"
                    " updated_at TEXT NOT NULL, updated_by TEXT)"
                )
            finally:
                db.close()
            self._ready = True
        existing = self._read_current()
        self._note_existing(existing)
        if existing is None:
            self._seed()

    @staticmethod
    def _row(row) -> ShapingRecord:
        return ShapingRecord(version=int(row[0]), weights=json.loads(row[1]), updated_at=row[2], updated_by=row[3])

    def _read_current(self) -> Optional[ShapingRecord]:
        db = self._connect()
        try:
            row = db.execute("SELECT version, weights, updated_at, updated_by FROM shaping_versions ORDER BY version DESC LIMIT 1").fetchone()
        finally:
            db.close()
        if row is not None:
            self._current = self._row(row)
        return self._current

    def current(self) -> ShapingRecord:
        self._ensure()
        # Cached in memory: this process is the only writer of an embedded server, and `put` refreshes the cache.
        return self._current or self._read_current()

    def get(self, version: int) -> Optional[ShapingRecord]:
        self._ensure()
        db = self._connect()
        try:
            row = db.execute("SELECT version, weights, updated_at, updated_by FROM shaping_versions WHERE version = ?", (version,)).fetchone()
        finally:
            db.close()
        return self._row(row) if row else None

    def history(self) -> List[ShapingRecord]:
        self._ensure()
        db = self._connect()
        try:
            rows = db.execute("SELECT version, weights, updated_at, updated_by FROM shaping_versions ORDER BY version").fetchall()
        finally:
            db.close()
        return [self._row(r) for r in rows]

    def put(self, weights: ShapingWeights, expected_version: int, updated_by: Optional[str]) -> ShapingRecord:
        self._ensure()  # (re-entrant for the seeding call: _ready is set before seeding)
        record = None
        db = self._connect()
        try:
            db.execute("BEGIN IMMEDIATE")  # takes the write lock now: read-compare-insert is atomic across processes
            try:
                (current,) = db.execute("SELECT COALESCE(MAX(version), 0) FROM shaping_versions").fetchone()
                if current != expected_version:
                    raise StaleVersion(current)
                record = ShapingRecord(current + 1, weights.as_dict(), _now(), updated_by)
                db.execute(
                    "INSERT INTO shaping_versions (version, weights, updated_at, updated_by) VALUES (?, ?, ?, ?)",
                    (record.version, json.dumps(record.weights), record.updated_at, record.updated_by),
                )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        finally:
            db.close()
        self._current = record
        return record


# KEYS[1] = current version number, KEYS[2] = hash version → JSON record. ARGV[1] = expected version, ARGV[2] = record.
_CAS = """
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
if cur ~= tonumber(ARGV[1]) then return {0, cur} end
local n = cur + 1
redis.call('HSET', KEYS[2], tostring(n), ARGV[2])
redis.call('SET', KEYS[1], tostring(n))
return {1, n}
"""


class RedisShapingStore(ShapingStore):
    """Keys `<prefix>:shaping:current` and `<prefix>:shaping:versions` (same prefix convention as workers.celery_app.keys)."""

    remote = True

    def __init__(self, url: str, prefix: str, initial: ShapingWeights, client=None):
        super().__init__(initial)
        self.url = url
        self.current_key = f"{prefix}:shaping:current"
        self.versions_key = f"{prefix}:shaping:versions"
        self._client = client
        self._script = None
        self._cache: Dict[int, ShapingRecord] = {}  # versions are immutable

    @property
    def client(self):
        if self._client is None:
            import redis

            self._client = redis.Redis.from_url(self.url, socket_timeout=5, socket_connect_timeout=2)
        return self._client

    def _call(self, fn, *args):
        import redis

        from service.executor import Unavailable

        try:
            return fn(*args)
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
            raise Unavailable(f"Redis is unavailable ({type(exc).__name__}); retry shortly") from exc

    def _record(self, version: int, blob) -> ShapingRecord:
        data = json.loads(blob)
        return ShapingRecord(version, data["weights"], data["updated_at"], data.get("updated_by"))

    def get(self, version: int) -> Optional[ShapingRecord]:
        if version in self._cache:
            return self._cache[version]
        blob = self._call(self.client.hget, self.versions_key, str(version))
        if blob is None:
            return None
        record = self._cache[version] = self._record(version, blob)
        return record

    def current(self) -> ShapingRecord:
        raw = self._call(self.client.get, self.current_key)  # one GET per request; the record itself is cached
        if raw is None:
            self._noted = True  # nothing stored before this process: the configured weights become version 1
            self._seed()
            raw = self._call(self.client.get, self.current_key)
        record = self.get(int(raw))
        self._note_existing(record)
        return record

    def history(self) -> List[ShapingRecord]:
        if self._call(self.client.get, self.current_key) is None:
            self._seed()
        blobs = self._call(self.client.hgetall, self.versions_key)
        return sorted((self._record(int(k), v) for k, v in blobs.items()), key=lambda r: r.version)

    def put(self, weights: ShapingWeights, expected_version: int, updated_by: Optional[str]) -> ShapingRecord:
        if self._script is None:
            self._script = self.client.register_script(_CAS)
        at = _now()
        blob = json.dumps({"weights": weights.as_dict(), "updated_at": at, "updated_by": updated_by})
        ok, version = self._call(self._script, [self.current_key, self.versions_key], [expected_version, blob])
        if not ok:
            raise StaleVersion(int(version))
        record = self._cache[int(version)] = ShapingRecord(int(version), weights.as_dict(), at, updated_by)
        return record


def make_store(settings) -> ShapingStore:
    initial = settings.shaping_weights()
    if settings.broker_url:
        return RedisShapingStore(settings.broker_url, settings.key_prefix, initial)
    if settings.state_db:
        path = Path(settings.state_db)
    else:
        from workers.demo_model import default_cache_dir

        path = default_cache_dir() / "shaping.sqlite3"
    return SqliteShapingStore(path, initial)
