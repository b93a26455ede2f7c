"""Collections, documents, chunks and vectors in the index database.

Every write is one transaction: a document, its chunks and its FTS row are
stored together or not at all. Vectors are added later by the embedder; a
chunk without a vector is counted in `needsEmbedding` and BM25 never waits
for it.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import PurePosixPath
from typing import Any

from npuserve.daemon.errors import IndexError_
from npuserve.daemon.index.db import IndexDB
from npuserve.daemon.models.vector_rows import VectorRows, le_bytes

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # whole name: fullmatch
MAX_PATH = 1024


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def check_collection_name(name: str) -> str:
    # fullmatch: "$" would also match before a trailing newline ("adv\n" was accepted).
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise IndexError_("collection name must be 1-64 characters of letters, digits,"
                          " '.', '_' or '-', starting with a letter or digit")
    return name


def check_document_path(path: str) -> str:
    """A relative POSIX path without '..', empty or '.' parts, or control characters."""
    if not isinstance(path, str) or not path or len(path) > MAX_PATH:
        raise IndexError_(f"document path must be 1-{MAX_PATH} characters")
    if any(ord(ch) < 32 for ch in path) or "\\" in path:
        raise IndexError_("document path must not contain control characters or backslashes")
    parts = PurePosixPath(path).parts
    if path.startswith("/") or any(p in ("..", ".", "") for p in path.split("/")):
        raise IndexError_("document path must be relative, without '.' or '..' segments")
    return "/".join(parts)


def content_hash(title: str, body: str) -> str:
    return hashlib.sha256(f"{title}\x00{body}".encode()).hexdigest()


@dataclass
class StoredDoc:
    status: str  # created | replaced | unchanged
    hash: str
    chunks: int


class IndexStore:
    def __init__(self, db: IndexDB) -> None:
        self.db = db

    # --- collections ------------------------------------------------------

    def create_collection(self, name: str, path: str = "", pattern: str = "**/*.md",
                          include_by_default: bool = True) -> bool:
        """True if created, False if it existed (then its settings are updated)."""
        check_collection_name(name)
        ts = now_iso()
        with self.db.transaction() as c:
            row = c.execute("SELECT id FROM collections WHERE name=?", (name,)).fetchone()
            if row:
                c.execute("UPDATE collections SET path=?, pattern=?, include_by_default=?,"
                          " updated_at=? WHERE id=?",
                          (path, pattern, int(include_by_default), ts, row[0]))
                return False
            c.execute("INSERT INTO collections(name, path, pattern, include_by_default,"
                      " created_at, updated_at) VALUES (?,?,?,?,?,?)",
                      (name, path, pattern, int(include_by_default), ts, ts))
            return True

    def delete_collection(self, name: str) -> int:
        with self.db.transaction() as c:
            cid = self._collection_id(c, name)
            if self._has_vectors(c):
                c.execute("DELETE FROM chunk_vecs WHERE rowid IN (SELECT ch.id FROM chunks ch"
                          " JOIN documents d ON d.id=ch.document_id WHERE d.collection_id=?)",
                          (cid,))
            n = c.execute("SELECT count(*) FROM documents WHERE collection_id=?",
                          (cid,)).fetchone()[0]
            c.execute("DELETE FROM documents WHERE collection_id=?", (cid,))
            c.execute("DELETE FROM collections WHERE id=?", (cid,))
            return n

    def _collection_id(self, c: Any, name: str) -> int:
        row = c.execute("SELECT id FROM collections WHERE name=?", (name,)).fetchone()
        if row is None:
            raise IndexError_(f"no collection named {name!r}", status=404)
        return row[0]

    def collections(self) -> list[dict[str, Any]]:
        sql = """SELECT c.name, c.path, c.pattern, c.include_by_default, c.updated_at,
                        count(d.id), max(d.modified_at)
                 FROM collections c LEFT JOIN documents d ON d.collection_id=c.id
                 GROUP BY c.id ORDER BY c.name"""
        rows = self.db.read(lambda c: c.execute(sql).fetchall())
        return [{"name": r[0], "path": r[1], "pattern": r[2], "include_by_default": bool(r[3]),
                 "documents": r[5], "last_modified": r[6] or r[4]} for r in rows]

    # --- documents ----------------------------------------------------------

    @staticmethod
    def _has_vectors(c: Any) -> bool:
        return c.execute("SELECT 1 FROM sqlite_master WHERE name='chunk_vecs'").fetchone() \
            is not None

    def put_documents(self, collection: str, docs: list[dict[str, Any]],
                      chunked: list[list[tuple[str, int]]]) -> list[StoredDoc]:
        """Store documents with their chunks in ONE transaction (all or none)."""
        ts = now_iso()
        out: list[StoredDoc] = []
        with self.db.transaction() as c:
            cid = self._collection_id(c, collection)
            vectors = self._has_vectors(c)
            for doc, chunks in zip(docs, chunked, strict=True):
                out.append(self._put_one(c, cid, doc, chunks, ts, vectors))
        return out

    def _put_one(self, c: Any, cid: int, doc: dict[str, Any], chunks: list[tuple[str, int]],
                 ts: str, vectors: bool) -> StoredDoc:
        h = doc["hash"]
        row = c.execute("SELECT id, hash FROM documents WHERE collection_id=? AND path=?",
                        (cid, doc["path"])).fetchone()
        meta = json.dumps(doc.get("metadata") or {}, ensure_ascii=False)
        if row and row[1] == h:
            c.execute("UPDATE documents SET metadata=? WHERE id=?", (meta, row[0]))
            n = c.execute("SELECT count(*) FROM chunks WHERE document_id=?",
                          (row[0],)).fetchone()[0]
            return StoredDoc("unchanged", h, n)
        if row:
            if vectors:
                c.execute("DELETE FROM chunk_vecs WHERE rowid IN"
                          " (SELECT id FROM chunks WHERE document_id=?)", (row[0],))
            c.execute("DELETE FROM chunks WHERE document_id=?", (row[0],))
            c.execute("UPDATE documents SET title=?, body=?, metadata=?, hash=?, modified_at=?"
                      " WHERE id=?", (doc["title"], doc["body"], meta, h, ts, row[0]))
            doc_id, status = row[0], "replaced"
        else:
            c.execute("INSERT INTO documents(collection_id, path, title, body, metadata, hash,"
                      " created_at, modified_at) VALUES (?,?,?,?,?,?,?,?)",
                      (cid, doc["path"], doc["title"], doc["body"], meta, h, ts, ts))
            doc_id, status = c.last_insert_rowid(), "created"
        for seq, (text, tokens) in enumerate(chunks):
            c.execute("INSERT INTO chunks(document_id, seq, text, tokens) VALUES (?,?,?,?)",
                      (doc_id, seq, text, tokens))
        return StoredDoc(status, h, len(chunks))

    def unchanged(self, collection: str, path: str, h: str) -> bool:
        def q(c: Any) -> bool:
            row = c.execute("SELECT d.hash FROM documents d JOIN collections c"
                            " ON c.id=d.collection_id WHERE c.name=? AND d.path=?",
                            (collection, path)).fetchone()
            return bool(row and row[0] == h)
        return self.db.read(q)

    def get_document(self, collection: str, path: str) -> dict[str, Any]:
        def q(c: Any) -> Any:
            cid = self._collection_id(c, collection)
            return c.execute(
                "SELECT d.path, d.title, d.body, d.metadata, d.hash, d.created_at,"
                " d.modified_at, (SELECT count(*) FROM chunks WHERE document_id=d.id),"
                " (SELECT count(*) FROM chunks WHERE document_id=d.id AND embedded=1)"
                " FROM documents d WHERE d.collection_id=? AND d.path=?",
                (cid, path)).fetchone()
        row = self.db.read(q)
        if row is None:
            raise IndexError_(f"no document {path!r} in {collection!r}", status=404)
        return {"path": row[0], "title": row[1], "body": row[2], "metadata": json.loads(row[3]),
                "hash": row[4], "createdAt": row[5], "modifiedAt": row[6], "chunks": row[7],
                "embeddedChunks": row[8]}

    def delete_document(self, collection: str, path: str) -> None:
        with self.db.transaction() as c:
            cid = self._collection_id(c, collection)
            row = c.execute("SELECT id FROM documents WHERE collection_id=? AND path=?",
                            (cid, path)).fetchone()
            if row is None:
                raise IndexError_(f"no document {path!r} in {collection!r}", status=404)
            if self._has_vectors(c):
                c.execute("DELETE FROM chunk_vecs WHERE rowid IN"
                          " (SELECT id FROM chunks WHERE document_id=?)", (row[0],))
            c.execute("DELETE FROM documents WHERE id=?", (row[0],))

    # --- embedding ------------------------------------------------------------

    def pending_chunks(self, limit: int) -> list[tuple[int, int, str, str]]:
        """(chunk id, collection id, title, text) of chunks due for embedding."""
        sql = """SELECT ch.id, d.collection_id, d.title, ch.text FROM chunks ch
                 JOIN documents d ON d.id=ch.document_id
                 WHERE ch.embedded=0 AND ch.retry_at<=? ORDER BY ch.id LIMIT ?"""
        return self.db.read(lambda c: c.execute(sql, (time.time(), limit)).fetchall())

    def store_vectors(self, ids: list[int], collection_ids: list[int], vectors: VectorRows,
                      model: str, fingerprint: str) -> int:
        """Write vectors for chunks that still exist (a document may have changed meanwhile)."""
        dim = int(vectors.shape[1])
        written = 0
        with self.db.transaction() as c:
            self.db.ensure_vector_table(c, model, dim, fingerprint)
            for cid, coll, vec in zip(ids, collection_ids, vectors, strict=True):
                if c.execute("SELECT 1 FROM chunks WHERE id=? AND embedded=0",
                             (cid,)).fetchone() is None:
                    continue
                c.execute("INSERT INTO chunk_vecs(rowid, collection_id, embedding) VALUES (?,?,?)",
                          (cid, coll, le_bytes(vec)))
                c.execute("UPDATE chunks SET embedded=1, last_error=NULL WHERE id=?", (cid,))
                written += 1
        return written

    def embedding_failed(self, ids: list[int], error: str, backoff: float) -> None:
        with self.db.transaction() as c:
            for cid in ids:
                c.execute("UPDATE chunks SET attempts=attempts+1, last_error=?, retry_at=?"
                          " WHERE id=?", (error[:500], time.time() + backoff, cid))

    def vector_model(self) -> tuple[str | None, int | None, str | None]:
        """(model, dimension, fingerprint) of the stored vectors; Nones before the first."""
        # One read: two would straddle the first embedding's commit and see the
        # dimension without the model (a false "different embedding model" 409).
        rows = dict(self.db.read(lambda c: c.execute(
            "SELECT key, value FROM meta WHERE key IN ('embed_model', 'embed_dim',"
            " 'embed_fingerprint')").fetchall()))
        dim = rows.get("embed_dim")
        return rows.get("embed_model"), int(dim) if dim else None, rows.get("embed_fingerprint")

    # --- status ----------------------------------------------------------------

    def counts(self) -> tuple[int, int]:
        """(documents, documents with at least one chunk not yet embedded)."""
        def q(c: Any) -> tuple[int, int]:
            total = c.execute("SELECT count(*) FROM documents").fetchone()[0]
            pending = c.execute("SELECT count(DISTINCT document_id) FROM chunks"
                                " WHERE embedded=0").fetchone()[0]
            return total, pending
        return self.db.read(q)
