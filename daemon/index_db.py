"""The index database: one SQLite file (apsw, which can load sqlite-vec), its schema
and migrations. WAL with synchronous=FULL: a write that returned is on disk."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger("npuserve.index")
SCHEMA_VERSION = 1

# Each entry migrates from version i to i+1.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE collections(
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        path TEXT NOT NULL DEFAULT '',
        pattern TEXT NOT NULL DEFAULT '**/*.md',
        include_by_default INTEGER NOT NULL DEFAULT 1,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL
    );
    CREATE TABLE documents(
        id INTEGER PRIMARY KEY,
        collection_id INTEGER NOT NULL REFERENCES collections(id) ON DELETE CASCADE,
        path TEXT NOT NULL,
        title TEXT NOT NULL,
        body TEXT NOT NULL,
        metadata TEXT NOT NULL DEFAULT '{}',
        hash TEXT NOT NULL,
        created_at TEXT NOT NULL,
        modified_at TEXT NOT NULL,
        UNIQUE(collection_id, path)
    );
    CREATE TABLE chunks(
        id INTEGER PRIMARY KEY,
        document_id INTEGER NOT NULL REFERENCES documents(id) ON DELETE CASCADE,
        seq INTEGER NOT NULL,
        text TEXT NOT NULL,
        tokens INTEGER NOT NULL,
        embedded INTEGER NOT NULL DEFAULT 0,
        attempts INTEGER NOT NULL DEFAULT 0,
        retry_at REAL NOT NULL DEFAULT 0,
        last_error TEXT
    );
    CREATE INDEX chunks_pending ON chunks(embedded, retry_at);
    CREATE INDEX chunks_document ON chunks(document_id);
    CREATE VIRTUAL TABLE documents_fts USING fts5(
        title, body, content='documents', content_rowid='id', tokenize='porter unicode61'
    );
    CREATE TRIGGER documents_ai AFTER INSERT ON documents BEGIN
        INSERT INTO documents_fts(rowid, title, body) VALUES (new.id, new.title, new.body);
    END;
    CREATE TRIGGER documents_ad AFTER DELETE ON documents BEGIN
        INSERT INTO documents_fts(documents_fts, rowid, title, body)
        VALUES ('delete', old.id, old.title, old.body);
    END;
    CREATE TRIGGER documents_au AFTER UPDATE ON documents BEGIN
        INSERT INTO documents_fts(documents_fts, rowid, title, body)
        VALUES ('delete', old.id, old.title, old.body);
        INSERT INTO documents_fts(rowid, title, body) VALUES (new.id, new.title, new.body);
    END;
    """,
]


class StorageError(Exception):
    """The index could not be written (disk full, read-only, I/O error). The transaction
    was rolled back: nothing of the request was stored. `status` is the HTTP answer."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def storage_error(exc: BaseException) -> StorageError | None:
    """The client-facing form of an SQLite failure the client cannot fix by changing its
    request, or None for anything else (a bug, which must surface as such)."""
    import apsw

    if isinstance(exc, apsw.FullError):
        return StorageError("the disk holding the index is full; nothing was stored", 507)
    if isinstance(exc, apsw.ReadOnlyError):
        return StorageError("the index is read-only now; nothing was stored", 503)
    if isinstance(exc, apsw.IOError | apsw.CantOpenError | apsw.BusyError):
        return StorageError(f"the index could not be written ({type(exc).__name__});"
                            " nothing was stored", 503)
    return None


class IndexDB:
    """One connection, used from worker threads one call at a time (a lock)."""

    def __init__(self, path: Path) -> None:
        import apsw
        import sqlite_vec

        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = apsw.Connection(str(path))
        self.conn.enable_load_extension(True)
        self.conn.load_extension(sqlite_vec.loadable_path())
        self.conn.enable_load_extension(False)
        self.conn.set_busy_timeout(5000)
        self.lock = threading.Lock()
        with self.lock:
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=FULL")
            self.conn.execute("PRAGMA foreign_keys=ON")
            self._migrate()

    def _migrate(self) -> None:
        version = self.conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RuntimeError(f"index {self.path} has schema {version}, newer than this"
                               f" npuserve ({SCHEMA_VERSION})")
        for target in range(version + 1, SCHEMA_VERSION + 1):
            with self.conn:
                self.conn.execute(MIGRATIONS[target - 1])
                self.conn.execute(f"PRAGMA user_version={target}")
            log.info("index %s migrated to schema %d", self.path, target)

    @contextmanager
    def transaction(self) -> Iterator[Any]:
        """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any error: all or nothing."""
        with self.lock:
            try:
                self.conn.execute("BEGIN IMMEDIATE")
                try:
                    yield self.conn
                except BaseException:
                    self._rollback()
                    raise
                try:
                    self.conn.execute("COMMIT")
                except BaseException:
                    self._rollback()
                    raise
            except Exception as exc:
                translated = storage_error(exc)
                if translated is None:
                    raise
                log.error("index write failed: %s", exc)
                raise translated from exc

    def _rollback(self) -> None:
        # A full disk or a vanished file can make ROLLBACK fail too; SQLite has then
        # rolled back already (the journal says what is committed).
        try:
            if not self.conn.getautocommit():
                self.conn.execute("ROLLBACK")
        except Exception as exc:  # the original error is the one to report
            log.warning("rollback after a failed write: %s", exc)

    def read(self, fn: Callable[[Any], Any]) -> Any:
        with self.lock:
            return fn(self.conn)

    def meta(self, key: str) -> str | None:
        row = self.read(lambda c: c.execute("SELECT value FROM meta WHERE key=?",
                                            (key,)).fetchone())
        return row[0] if row else None

    def has_vector_table(self) -> bool:
        return self.read(lambda c: c.execute(
            "SELECT 1 FROM sqlite_master WHERE name='chunk_vecs'").fetchone()) is not None

    def ensure_vector_table(self, conn: Any, model: str, dim: int) -> None:
        """Create the vec0 table for `dim` on first use; inside a transaction."""
        exists = conn.execute("SELECT 1 FROM sqlite_master WHERE name='chunk_vecs'").fetchone()
        if not exists:
            conn.execute(
                "CREATE VIRTUAL TABLE chunk_vecs USING vec0(collection_id integer partition key,"
                f" embedding float[{int(dim)}] distance_metric=cosine)")
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('embed_model', ?), ('embed_dim', ?)",
                         (model, str(dim)))

    def close(self) -> None:
        with self.lock:
            self.conn.close()
