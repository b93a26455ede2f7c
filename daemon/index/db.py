"""The index database: one SQLite file (apsw, which can load sqlite-vec), its schema
and migrations. WAL with synchronous=FULL: a write that returned is on disk."""

from __future__ import annotations

import importlib.util
import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from npuserve.daemon.errors import ApiError, StorageError

log = logging.getLogger("npuserve.index")


class VectorsMismatch(ApiError):
    """Vectors of another embedding model than the index holds (they do not mix)."""

    status = 409
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


def vec_extension_path() -> str:
    """sqlite-vec's loadable extension, found without importing the sqlite_vec package:
    that import pulls in numpy (11 MB) and sqlite3, which the daemon otherwise never needs."""
    spec = importlib.util.find_spec("sqlite_vec")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("sqlite-vec is not installed (pip install sqlite-vec)")
    return os.path.join(list(spec.submodule_search_locations)[0], "vec0")


class IndexDB:
    """One connection, used from worker threads one call at a time (a lock)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.Lock()
        self.readonly = False
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.conn = self._open_rw()
        except Exception as exc:
            # A read-only file system (or file): searches still work; writes answer 503
            # and try the read-write open again, so the index heals when the fault goes.
            if storage_error(exc) is None or not path.exists():
                raise
            log.warning("index %s opens read-only: %s", path, exc)
            self.conn = self._open_ro()

    def _open_rw(self) -> Any:
        import apsw

        conn = apsw.Connection(str(self.path))
        try:
            self._load_vec(conn)
            conn.set_busy_timeout(5000)
            # A new connection is private to this call until assigned: no lock needed.
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            self._migrate(conn)
        except BaseException:
            conn.close()
            raise
        self.readonly = False
        return conn

    def _open_ro(self) -> Any:
        import apsw

        # immutable=1: no -shm/-wal needed (they cannot be created on a read-only file
        # system); right while nothing can write the file anyway.
        uri = f"file:{self.path}?immutable=1"
        conn = apsw.Connection(uri, flags=apsw.SQLITE_OPEN_READONLY | apsw.SQLITE_OPEN_URI)
        self._load_vec(conn)
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version != SCHEMA_VERSION:
            conn.close()
            raise RuntimeError(f"read-only index {self.path} has schema {version}; this"
                               f" npuserve needs {SCHEMA_VERSION} and cannot migrate it")
        self.readonly = True
        return conn

    @staticmethod
    def _load_vec(conn: Any) -> None:
        conn.enable_load_extension(True)
        conn.load_extension(vec_extension_path())
        conn.enable_load_extension(False)

    def _writable(self) -> None:
        """Called under the lock before a write: reopen read-write if we are read-only."""
        if not self.readonly:
            return
        try:
            conn = self._open_rw()
        except Exception as exc:
            translated = storage_error(exc)
            if translated is None:
                raise
            raise StorageError("the index is read-only now; nothing was stored", 503) from exc
        self.conn.close()
        self.conn = conn
        log.info("index %s is writable again", self.path)

    def _migrate(self, conn: Any) -> None:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RuntimeError(f"index {self.path} has schema {version}, newer than this"
                               f" npuserve ({SCHEMA_VERSION})")
        for target in range(version + 1, SCHEMA_VERSION + 1):
            with conn:
                conn.execute(MIGRATIONS[target - 1])
                conn.execute(f"PRAGMA user_version={target}")
            log.info("index %s migrated to schema %d", self.path, target)

    @contextmanager
    def transaction(self) -> Iterator[Any]:
        """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any error: all or nothing."""
        with self.lock:
            self._writable()
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

    def ensure_vector_table(self, conn: Any, model: str, dim: int, fingerprint: str) -> None:
        """Create the vec0 table for `dim` on first use; inside a transaction. Vectors of
        another embedding model (fingerprint) are refused: the two do not mix. An index from
        before fingerprints takes the current one when its model name and dimension agree."""
        exists = conn.execute("SELECT 1 FROM sqlite_master WHERE name='chunk_vecs'").fetchone()
        if not exists:
            conn.execute(
                "CREATE VIRTUAL TABLE chunk_vecs USING vec0(collection_id integer partition key,"
                f" embedding float[{int(dim)}] distance_metric=cosine)")
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('embed_model', ?), ('embed_dim', ?),"
                         " ('embed_fingerprint', ?)", (model, str(dim), fingerprint))
            return
        meta = dict(conn.execute("SELECT key, value FROM meta WHERE key IN"
                                 " ('embed_model', 'embed_dim', 'embed_fingerprint')").fetchall())
        stored = meta.get("embed_fingerprint")
        same = meta.get("embed_model") == model and meta.get("embed_dim") == str(dim)
        if stored is None and same:
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('embed_fingerprint', ?)",
                         (fingerprint,))
        elif stored != fingerprint or meta.get("embed_dim") != str(dim):
            raise VectorsMismatch(
                f"the index holds vectors of {meta.get('embed_model')} ({stored},"
                f" {meta.get('embed_dim')}-d); the daemon now embeds with {model}"
                f" ({fingerprint}, {dim}-d): re-embed the index or configure the old model")

    def close(self) -> None:
        with self.lock:
            self.conn.close()
