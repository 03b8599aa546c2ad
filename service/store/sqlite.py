"""Embedded session store: one SQLite file in WAL mode.

URL form follows SQLAlchemy: `sqlite:///relative/path.sqlite3`, `sqlite:////absolute/path.sqlite3`.
synchronous=FULL makes every commit survive power loss, not only a killed process. The connection is used
from one thread at a time (the service's store thread).
"""

import os
import sqlite3
import threading
from array import array

from kvshard.service.errors import QuotaExceeded, SessionConflict, SessionExists
from kvshard.service.store.base import LayerDelta, Lease, SessionRecord, written_bytes

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    session_id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    record TEXT NOT NULL,
    token_ids BLOB NOT NULL,
    updated_at_ms INTEGER NOT NULL,
    version INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS sessions_by_tenant ON sessions (tenant, session_id);
CREATE INDEX IF NOT EXISTS sessions_by_update ON sessions (updated_at_ms);
CREATE TABLE IF NOT EXISTS tails (
    session_id TEXT NOT NULL,
    layer INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (session_id, layer)
);
CREATE TABLE IF NOT EXISTS blocks (
    session_id TEXT NOT NULL,
    layer INTEGER NOT NULL,
    start INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (session_id, layer, start)
);
"""

_BYTES_OF = """
SELECT (SELECT COALESCE(SUM(LENGTH(data)), 0) FROM blocks WHERE session_id = :id)
     + (SELECT COALESCE(SUM(LENGTH(data)), 0) FROM tails WHERE session_id = :id)
     + (SELECT LENGTH(record) + LENGTH(token_ids) FROM sessions WHERE session_id = :id)
"""

# The same sum over a tenant's sessions (LENGTH of a blob reads its size, not its pages).
_TENANT_BYTES = """
SELECT (SELECT COALESCE(SUM(LENGTH(b.data)), 0) FROM blocks b JOIN sessions s USING (session_id) WHERE s.tenant = :tenant)
     + (SELECT COALESCE(SUM(LENGTH(t.data)), 0) FROM tails t JOIN sessions s USING (session_id) WHERE s.tenant = :tenant)
     + (SELECT COALESCE(SUM(LENGTH(record) + LENGTH(token_ids)), 0) FROM sessions WHERE tenant = :tenant)
"""


def pack_tokens(token_ids: list[int]) -> bytes:
    return array("I", token_ids).tobytes()


def unpack_tokens(blob: bytes) -> list[int]:
    tokens = array("I")
    tokens.frombytes(blob)
    return tokens.tolist()


class SQLiteStore:
    kind = "sqlite"
    shared = False  # one shard per file

    def __init__(self, path: str):
        if path != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._lock = threading.Lock()  # the service calls from one thread; tests and tools may not
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    @classmethod
    def from_url(cls, url: str) -> "SQLiteStore":
        path = url.removeprefix("sqlite:///")
        if not path or path == url:
            raise ValueError(f"store: expected sqlite:///path, got {url!r}")
        return cls(path)

    def create(self, record: SessionRecord, deltas: list[LayerDelta], lease: Lease | None = None, tenant_quota: int = 0) -> None:
        # One shard per file: no leases to grant or check.
        with self._lock, self._transaction():
            if self._db.execute("SELECT 1 FROM sessions WHERE session_id = ?", (record.session_id,)).fetchone():
                raise SessionExists(record.session_id)
            self._check_quota(record, written_bytes(record, deltas), tenant_quota)
            self._db.execute(
                "INSERT INTO sessions VALUES (?, ?, ?, ?, ?, ?)",
                (record.session_id, record.tenant, record.to_json(), pack_tokens(record.token_ids), record.updated_at_ms, record.version),
            )
            self._write_layers(record.session_id, deltas)

    def commit(self, record: SessionRecord, deltas: list[LayerDelta], lease: Lease | None = None, tenant_quota: int = 0) -> None:
        with self._lock, self._transaction():
            self._commit_one(record, deltas, tenant_quota)

    def commit_many(self, commits: list[tuple]) -> list[BaseException | None]:
        """Several sessions' commits (commit's arguments each) in one transaction, so one fsync makes them all
        durable (a group commit: 32 streams ending together waited for 32 fsyncs one after another). Each is
        applied or refused on its own, as `commit` would, under a savepoint: the outcome per commit, None when
        it landed. An error of the transaction itself is every commit's."""
        outcomes = []
        with self._lock, self._transaction():
            for record, deltas, _lease, tenant_quota in commits:
                self._db.execute("SAVEPOINT one_commit")
                try:
                    self._commit_one(record, deltas, tenant_quota)
                except Exception as error:  # noqa: BLE001 (that commit's own outcome; the others still land)
                    self._db.execute("ROLLBACK TO one_commit")
                    outcomes.append(error)
                else:
                    outcomes.append(None)
                self._db.execute("RELEASE one_commit")
        return outcomes

    def _commit_one(self, record: SessionRecord, deltas: list[LayerDelta], tenant_quota: int) -> None:
        if tenant_quota:
            self._check_quota(record, written_bytes(record, deltas) - self._replaced_bytes(record.session_id, deltas), tenant_quota)
        updated = self._db.execute(
            "UPDATE sessions SET record = ?, token_ids = ?, updated_at_ms = ?, version = ? WHERE session_id = ? AND version = ?",
            (record.to_json(), pack_tokens(record.token_ids), record.updated_at_ms, record.version, record.session_id, record.version - 1),
        )
        if updated.rowcount != 1:
            raise SessionConflict(record.session_id)
        self._write_layers(record.session_id, deltas)

    def _replaced_bytes(self, session_id: str, deltas: list[LayerDelta]) -> int:
        """Stored bytes a commit of these deltas overwrites: the record, and per layer its tail and the blocks
        from keep_until on."""
        total = self._db.execute("SELECT COALESCE(SUM(LENGTH(record) + LENGTH(token_ids)), 0) FROM sessions WHERE session_id = ?", (session_id,)).fetchone()[0]
        for delta in deltas:
            total += self._db.execute(
                "SELECT (SELECT COALESCE(SUM(LENGTH(data)), 0) FROM tails WHERE session_id = :id AND layer = :layer)"
                " + (SELECT COALESCE(SUM(LENGTH(data)), 0) FROM blocks WHERE session_id = :id AND layer = :layer AND start >= :keep)",
                {"id": session_id, "layer": delta.layer, "keep": delta.keep_until},
            ).fetchone()[0]
        return total

    def _check_quota(self, record: SessionRecord, grown: int, quota: int) -> None:
        """(in the write transaction, before any write) QuotaExceeded if the change grows the session and would
        leave its tenant storing more than the quota. Shrinking is always allowed."""
        if quota and grown > 0:
            held = self._db.execute(_TENANT_BYTES, {"tenant": record.tenant}).fetchone()[0]
            if held + grown > quota:
                raise QuotaExceeded(record.tenant, held, grown, quota)

    def tenant_bytes(self, tenant: str) -> int:
        with self._lock:
            return self._db.execute(_TENANT_BYTES, {"tenant": tenant}).fetchone()[0]

    def version(self, session_id: str) -> int | None:
        with self._lock:
            row = self._db.execute("SELECT version FROM sessions WHERE session_id = ?", (session_id,)).fetchone()
        return None if row is None else row[0]

    def _write_layers(self, session_id: str, deltas: list[LayerDelta]) -> None:
        for delta in deltas:
            self._db.execute(
                "DELETE FROM blocks WHERE session_id = ? AND layer = ? AND start >= ?",
                (session_id, delta.layer, delta.keep_until),
            )
            if delta.block is not None:
                self._db.execute(
                    "INSERT INTO blocks VALUES (?, ?, ?, ?)", (session_id, delta.layer, delta.keep_until, delta.block)
                )
            self._db.execute("INSERT OR REPLACE INTO tails VALUES (?, ?, ?)", (session_id, delta.layer, delta.tail))

    def load_record(self, session_id: str) -> SessionRecord | None:
        with self._lock:
            row = self._db.execute(
                "SELECT record, token_ids FROM sessions WHERE session_id = ?", (session_id,)
            ).fetchone()
            if row is None:
                return None
        return SessionRecord.from_json(row[0], unpack_tokens(row[1]), self.stored_bytes(session_id))

    def stored_bytes(self, session_id: str) -> int:
        with self._lock:
            return self._db.execute(_BYTES_OF, {"id": session_id}).fetchone()[0] or 0

    def load_layers(self, session_id: str, layers: int) -> list[tuple[bytes, list[tuple[int, bytes]]]]:
        with self._lock:
            tails = dict(self._db.execute("SELECT layer, data FROM tails WHERE session_id = ?", (session_id,)))
            blocks: list[list[tuple[int, bytes]]] = [[] for _ in range(layers)]
            for layer, start, data in self._db.execute(
                "SELECT layer, start, data FROM blocks WHERE session_id = ? ORDER BY layer, start", (session_id,)
            ):
                blocks[layer].append((start, data))
        return [(tails[layer], blocks[layer]) for layer in range(layers)]

    def delete(self, session_id: str) -> bool:
        with self._lock, self._transaction():
            for table in ("blocks", "tails"):
                self._db.execute(f"DELETE FROM {table} WHERE session_id = ?", (session_id,))
            return self._db.execute("DELETE FROM sessions WHERE session_id = ?", (session_id,)).rowcount > 0

    def page(self, tenant: str, after: str, limit: int) -> list[SessionRecord]:
        with self._lock:
            rows = self._db.execute(
                "SELECT session_id, record FROM sessions WHERE tenant = ? AND session_id > ? ORDER BY session_id LIMIT ?",
                (tenant, after, limit),
            ).fetchall()
        return [SessionRecord.from_json(text, [], self.stored_bytes(sid)) for sid, text in rows]

    def count(self, tenant: str | None = None) -> int:
        with self._lock:
            if tenant is None:
                return self._db.execute("SELECT COUNT(*) FROM sessions").fetchone()[0]
            return self._db.execute("SELECT COUNT(*) FROM sessions WHERE tenant = ?", (tenant,)).fetchone()[0]

    def idle_since(self, before_ms: int) -> list[str]:
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT session_id FROM sessions WHERE updated_at_ms < ?", (before_ms,))]

    def total_bytes(self) -> int:
        with self._lock:
            return self._db.execute(
                "SELECT (SELECT COALESCE(SUM(LENGTH(data)), 0) FROM blocks) + (SELECT COALESCE(SUM(LENGTH(data)), 0) FROM tails)"
                " + (SELECT COALESCE(SUM(LENGTH(record) + LENGTH(token_ids)), 0) FROM sessions)"
            ).fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._db.close()

    def _transaction(self):
        return _Transaction(self._db)


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any error."""

    def __init__(self, db: sqlite3.Connection):
        self._db = db

    def __enter__(self):
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind, error, traceback):
        self._db.execute("COMMIT" if kind is None else "ROLLBACK")
        return False
