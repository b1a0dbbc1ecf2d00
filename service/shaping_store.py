"""Durable shaping-weight versions of one deployment: one interface, SQLite (embedded default) and Redis (with a broker).

A deployment (`Deployment`) is the RM a server serves (its name and content revision) plus an optional deployment
name (`TOKENCREDIT_DEPLOYMENT`); its versions are stored under `Deployment.key`, so servers that share a state file
or a Redis database share a history only when they serve the same RM under the same name. Versions are immutable
and numbered 1, 2, ... per deployment; the current one is the highest. `put` is an atomic compare-and-set on the
current version number (SQLite: a `BEGIN IMMEDIATE` transaction; Redis: a Lua script), so two writers holding the
same ETag can never both win. An empty history starts at version 1 = the settings' initial weights.

Every read of the current version goes to the store (SQLite: `PRAGMA data_version` on a kept-open connection, and
a SELECT only when some connection has committed since; Redis: one GET), so servers sharing a deployment serve each
other's updates from their next request on. History written before deployments existed (keyed by nothing) moves,
once, to the first deployment that opens the store and can compute its weights.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple, Union

from tokencredit.types import Component, ShapingVersion, ShapingWeights
from workers.registry import computable_components

__all__ = [
    "Deployment", "ShapingStore", "SqliteShapingStore", "RedisShapingStore", "StaleVersion", "make_store",
]

log = logging.getLogger("tokencredit.shaping")

ALL_COMPONENTS = tuple(c.value for c in Component)


@dataclass(frozen=True)
class Deployment:
    """Whose shaping state: an optional deployment name and the RM served (directory name, content revision).

    `components` (what the RM can compute) is not part of the identity; it decides which weights a PUT may set.
    """

    name: Optional[str]
    model: str
    revision: str
    components: Tuple[str, ...] = field(default=ALL_COMPONENTS, compare=False)

    @property
    def key(self) -> str:
        """`[name/]model@revision`: what versions are stored under, and what the API reports as `deployment`."""
        rm = f"{self.model}@{self.revision}"
        return f"{self.name}/{rm}" if self.name else rm

    @classmethod
    def of(cls, name: Optional[str], model) -> "Deployment":
        """From a loaded `RewardModel` (a weightless validator in broker mode has the same name and revision)."""
        components = tuple(computable_components(model))
        return cls(name=name or None, model=model.name, revision=model.revision, components=components)

    def uncomputable(self, weights: Union[ShapingWeights, Mapping[str, float]]) -> List[str]:
        """Components with a positive weight that this RM cannot compute."""
        values = weights.as_dict() if isinstance(weights, ShapingWeights) else weights
        return [name for name, w in values.items() if w > 0 and name not in self.components]


class StaleVersion(Exception):
    """The compare-and-set lost: the current version is no longer the expected one."""

    def __init__(self, current: int):
        super().__init__(f"current version is {current}")
        self.current = current


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class ShapingStore:
    """Interface: the versions of one deployment. Every method may do I/O (callers run them off the event loop)."""

    def __init__(self, initial: ShapingWeights, deployment: Deployment):
        self.initial = initial
        self.deployment = deployment

    def current(self) -> ShapingVersion:
        raise NotImplementedError

    def get(self, version: int) -> Optional[ShapingVersion]:
        raise NotImplementedError

    def history(self) -> List[ShapingVersion]:
        raise NotImplementedError

    def put(self, weights: ShapingWeights, expected_version: int, updated_by: Optional[str]) -> ShapingVersion:
        """Store `weights` as version expected_version + 1 if the current version is expected_version, else StaleVersion."""
        raise NotImplementedError

    def _version(self, version: int, weights: Dict[str, float], updated_at: str, updated_by: Optional[str]) -> ShapingVersion:
        """A stored version as the admin API answers it: the wire type, naming this deployment."""
        return ShapingVersion(version=version, weights=weights, updated_at=updated_at, updated_by=updated_by,
                              deployment=self.deployment.key)

    def _note_existing(self, record: Optional[ShapingVersion]) -> None:
        """Once per process: say so when the durable store overrides the configured initial weights."""
        if getattr(self, "_noted", False) or record is None:
            return
        self._noted = True
        if record.shaping_weights().as_dict() != self.initial.as_dict():
            log.warning(
                "shaping version %d of deployment %s from the durable store is in use; the configured initial weights "
                "(TOKENCREDIT_WEIGHTS) apply only to an empty history: change weights with PUT /admin/v1/shaping",
                record.version, self.deployment.key,
            )

    def _seed(self) -> None:
        try:
            self.put(self.initial, 0, "initial settings")
        except StaleVersion:
            pass  # another process seeded it first

    def _adoptable(self, legacy_current: Optional[ShapingVersion], where: str) -> bool:
        """Whether this deployment may take the unscoped history whose current version is `legacy_current`."""
        if legacy_current is None:
            return False
        bad = self.deployment.uncomputable(legacy_current.weights)
        if bad:
            # That history was written for another kind of RM; a later deployment that can compute it takes it.
            log.warning("shaping: the unscoped history in %s weights %s at its current version %d, which %s cannot "
                        "compute; not migrated to deployment %s", where, bad, legacy_current.version,
                        self.deployment.model, self.deployment.key)
            return False
        return True


class SqliteShapingStore(ShapingStore):
    """Table `shaping_history (deployment, version, ...)` of one SQLite file, shared by every deployment using it."""

    def __init__(self, path, initial: ShapingWeights, deployment: Deployment):
        super().__init__(initial, deployment)
        self.path = Path(path).expanduser()
        self._lock = threading.Lock()
        self._ready = False
        self._current: Optional[ShapingVersion] = None
        self._records: Dict[int, ShapingVersion] = {}  # versions are immutable
        # Kept open for `PRAGMA data_version`, which changes only when another connection commits (our own
        # `put` uses a separate connection, so it counts too); used under `_read_lock` from any thread.
        self._reader: Optional[sqlite3.Connection] = None
        self._read_lock = threading.Lock()
        self._seen_data_version: Optional[int] = None

    def _connect(self, **kwargs) -> sqlite3.Connection:
        # isolation_level=None: we issue BEGIN IMMEDIATE ourselves; short-lived connections for writes (thread safe).
        return sqlite3.connect(str(self.path), timeout=10.0, isolation_level=None, **kwargs)

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
                    "CREATE TABLE IF NOT EXISTS shaping_history (deployment TEXT NOT NULL, version INTEGER NOT NULL,"
                    " weights TEXT NOT NULL, updated_at TEXT NOT NULL, updated_by TEXT, PRIMARY KEY (deployment, version))"
                )
                self._migrate_unscoped(db)
            finally:
                db.close()
            self._reader = self._connect(check_same_thread=False)
            self._ready = True
        existing = self._read_current()
        self._note_existing(existing)
        if existing is None:
            self._seed()

    def _migrate_unscoped(self, db: sqlite3.Connection) -> None:
        """Move the table of the unscoped era (`shaping_versions`) to this deployment, if it has no history yet."""
        db.execute("BEGIN IMMEDIATE")  # one migrating process at a time; the others then find no legacy table
        try:
            legacy = db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'shaping_versions'").fetchone()
            if legacy is None:
                db.execute("COMMIT")
                return
            rows = db.execute("SELECT version, weights, updated_at, updated_by FROM shaping_versions ORDER BY version").fetchall()
            (own,) = db.execute("SELECT COUNT(*) FROM shaping_history WHERE deployment = ?", (self.deployment.key,)).fetchone()
            if rows and own:
                log.info("shaping: %s has an unscoped history besides deployment %s's own; left for a deployment "
                         "without history", self.path, self.deployment.key)
            if rows and (own or not self._adoptable(self._row(rows[-1]), str(self.path))):
                db.execute("COMMIT")  # left for a deployment that has no history of its own
                return
            db.executemany(
                "INSERT INTO shaping_history (deployment, version, weights, updated_at, updated_by) VALUES (?, ?, ?, ?, ?)",
                [(self.deployment.key, *row) for row in rows],
            )
            db.execute("DROP TABLE shaping_versions")  # its rows now live under this deployment, unchanged
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        if rows:
            log.warning("shaping: migrated %d unscoped versions (current v%d) in %s to deployment %s; other deployments "
                        "using this file start their own history", len(rows), rows[-1][0], self.path, self.deployment.key)

    def _row(self, row) -> ShapingVersion:
        return self._version(int(row[0]), json.loads(row[1]), row[2], row[3])

    def _remember(self, record: Optional[ShapingVersion]) -> Optional[ShapingVersion]:
        # Versions only grow: a reader that raced a `put` must not put an older current version back.
        if record is not None and (self._current is None or record.version > self._current.version):
            self._current = record
        return self._current

    def _read_current(self) -> Optional[ShapingVersion]:
        with self._read_lock:
            seen = self._reader.execute("PRAGMA data_version").fetchone()[0]
            if seen == self._seen_data_version and self._current is not None:
                return self._current  # nobody has committed since the last read: one cheap pragma per request
            row = self._reader.execute(
                "SELECT version, weights, updated_at, updated_by FROM shaping_history WHERE deployment = ?"
                " ORDER BY version DESC LIMIT 1", (self.deployment.key,),
            ).fetchone()
            self._seen_data_version = seen
            return self._remember(self._row(row) if row else None)

    def current(self) -> ShapingVersion:
        self._ensure()
        record = self._read_current()
        if record is None:  # another thread is between opening the store and seeding it
            self._seed()
            record = self._read_current()
        return record

    def get(self, version: int) -> Optional[ShapingVersion]:
        self._ensure()
        if version in self._records:
            return self._records[version]
        db = self._connect()
        try:
            row = db.execute(
                "SELECT version, weights, updated_at, updated_by FROM shaping_history WHERE deployment = ? AND version = ?",
                (self.deployment.key, version),
            ).fetchone()
        finally:
            db.close()
        if row is None:
            return None
        record = self._records[version] = self._row(row)
        return record

    def history(self) -> List[ShapingVersion]:
        self._ensure()
        db = self._connect()
        try:
            rows = db.execute(
                "SELECT version, weights, updated_at, updated_by FROM shaping_history WHERE deployment = ? ORDER BY version",
                (self.deployment.key,),
            ).fetchall()
        finally:
            db.close()
        return [self._row(r) for r in rows]

    def put(self, weights: ShapingWeights, expected_version: int, updated_by: Optional[str]) -> ShapingVersion:
        self._ensure()  # (re-entrant for the seeding call: _ready is set before seeding)
        record = None
        db = self._connect()
        try:
            db.execute("BEGIN IMMEDIATE")  # takes the write lock now: read-compare-insert is atomic across processes
            try:
                (current,) = db.execute(
                    "SELECT COALESCE(MAX(version), 0) FROM shaping_history WHERE deployment = ?", (self.deployment.key,)
                ).fetchone()
                if current != expected_version:
                    raise StaleVersion(current)
                record = self._version(current + 1, weights.as_dict(), _now(), updated_by)
                db.execute(
                    "INSERT INTO shaping_history (deployment, version, weights, updated_at, updated_by) VALUES (?, ?, ?, ?, ?)",
                    (self.deployment.key, record.version, json.dumps(record.weights), record.updated_at, record.updated_by),
                )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        finally:
            db.close()
        self._records[record.version] = record
        with self._read_lock:
            self._remember(record)
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

# KEYS[1..2] = the unscoped current/versions keys, KEYS[3..4] = this deployment's. Renames them if this deployment
# has no history yet; 1 = migrated, 0 = nothing to migrate, -1 = this deployment already has its own history.
_MIGRATE = """
if redis.call('EXISTS', KEYS[1]) == 0 or redis.call('EXISTS', KEYS[2]) == 0 then return 0 end
if redis.call('EXISTS', KEYS[3]) == 1 then return -1 end
redis.call('RENAME', KEYS[2], KEYS[4])
redis.call('RENAME', KEYS[1], KEYS[3])
return 1
"""


class RedisShapingStore(ShapingStore):
    """Keys `<prefix>:shaping:<deployment key>:current` and `...:versions` (the prefix convention of
    workers.celery_app.keys); `<prefix>:shaping:current` and `:versions` are the unscoped era's."""

    def __init__(self, url: str, prefix: str, initial: ShapingWeights, deployment: Deployment, client=None):
        super().__init__(initial, deployment)
        self.url = url
        self.current_key = f"{prefix}:shaping:{deployment.key}:current"
        self.versions_key = f"{prefix}:shaping:{deployment.key}:versions"
        self.prefix = prefix
        self.legacy_keys = (f"{prefix}:shaping:current", f"{prefix}:shaping:versions")
        self._client = client
        self._script = None
        self._opened = False
        self._cache: Dict[int, ShapingVersion] = {}  # versions are immutable

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

    def _record(self, version: int, blob) -> ShapingVersion:
        data = json.loads(blob)
        return self._version(version, data["weights"], data["updated_at"], data.get("updated_by"))

    def _open(self) -> None:
        """Once per process (retried while Redis is down): take over the unscoped history if there is one."""
        if self._opened:
            return
        legacy_current, legacy_versions = self.legacy_keys
        raw = self._call(self.client.get, legacy_current)
        if raw is not None:
            blob = self._call(self.client.hget, legacy_versions, raw)
            legacy = self._record(int(raw), blob) if blob is not None else None
            where = f"Redis keys {self.prefix}:shaping:current/versions"
            if self._adoptable(legacy, where):
                keys = [legacy_current, legacy_versions, self.current_key, self.versions_key]
                moved = self._call(self.client.eval, _MIGRATE, len(keys), *keys)
                if moved == -1:
                    log.info("shaping: %s hold an unscoped history besides deployment %s's own; left for a deployment "
                             "without history", where, self.deployment.key)
                elif moved == 1:
                    log.warning("shaping: migrated %d unscoped versions (current v%d) in %s to deployment %s; other "
                                "deployments on this Redis start their own history",
                                self._call(self.client.hlen, self.versions_key), legacy.version, where, self.deployment.key)
        self._opened = True

    def get(self, version: int) -> Optional[ShapingVersion]:
        if version in self._cache:
            return self._cache[version]
        self._open()
        blob = self._call(self.client.hget, self.versions_key, str(version))
        if blob is None:
            return None
        record = self._cache[version] = self._record(version, blob)
        return record

    def current(self) -> ShapingVersion:
        self._open()
        raw = self._call(self.client.get, self.current_key)  # one GET per request; the record itself is cached
        if raw is None:
            self._noted = True  # nothing stored before this process: the configured weights become version 1
            self._seed()
            raw = self._call(self.client.get, self.current_key)
        record = self.get(int(raw))
        self._note_existing(record)
        return record

    def history(self) -> List[ShapingVersion]:
        self._open()
        if self._call(self.client.get, self.current_key) is None:
            self._seed()
        blobs = self._call(self.client.hgetall, self.versions_key)
        return sorted((self._record(int(k), v) for k, v in blobs.items()), key=lambda r: r.version)

    def put(self, weights: ShapingWeights, expected_version: int, updated_by: Optional[str]) -> ShapingVersion:
        self._open()
        if self._script is None:
            self._script = self.client.register_script(_CAS)
        at = _now()
        blob = json.dumps({"weights": weights.as_dict(), "updated_at": at, "updated_by": updated_by})
        ok, version = self._call(self._script, [self.current_key, self.versions_key], [expected_version, blob])
        if not ok:
            raise StaleVersion(int(version))
        record = self._cache[int(version)] = self._version(int(version), weights.as_dict(), at, updated_by)
        return record


def make_store(settings, deployment: Deployment) -> ShapingStore:
    initial = settings.shaping_weights()
    if settings.broker_url:
        return RedisShapingStore(settings.broker_url, settings.key_prefix, initial, deployment)
    if settings.state_db:
        path = Path(settings.state_db)
    else:
        from workers.demo_model import default_cache_dir

        path = default_cache_dir() / "shaping.sqlite3"
    return SqliteShapingStore(path, initial, deployment)
