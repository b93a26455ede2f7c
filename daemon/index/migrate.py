"""`npuserve index migrate --to postgres`: an SQLite index copied into PostgreSQL +
pgvector as it is — collections, documents, chunks, their vectors and the embedding
model's fingerprint — so nothing is embedded again. Ids are kept (the sequences move past
them). The target must be empty: one transaction, all or nothing."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

from npuserve.daemon.index.db import IndexDB
from npuserve.daemon.index.pg_storage import PostgresStorage

Say = Callable[[str], None]
BATCH = 2000


class MigrateError(RuntimeError):
    pass


def _rows(db: IndexDB, sql: str) -> list[Any]:
    return db.read(lambda c: c.execute(sql).fetchall())


def read_sqlite(path: Path) -> dict[str, Any]:
    """Everything the index holds, read in one pass of the file."""
    if not path.is_file():
        raise MigrateError(f"no SQLite index at {path}")
    db = IndexDB(path)
    try:
        meta = dict(_rows(db, "SELECT key, value FROM meta"))
        data = {
            "meta": meta,
            "collections": _rows(db, "SELECT id, name, path, pattern, include_by_default,"
                                     " created_at, updated_at FROM collections"),
            "documents": _rows(db, "SELECT id, collection_id, path, title, body, metadata,"
                                   " hash, created_at, modified_at FROM documents"),
            "chunks": _rows(db, "SELECT ch.id, ch.document_id, d.collection_id, ch.seq,"
                                " ch.text, ch.tokens, ch.embedded, ch.attempts, ch.retry_at,"
                                " ch.last_error FROM chunks ch JOIN documents d"
                                " ON d.id = ch.document_id"),
            "vectors": {},
        }
        if db.has_vector_table():
            dim = int(meta["embed_dim"])
            data["vectors"] = {rowid: list(struct.unpack(f"<{dim}f", blob)) for rowid, blob
                               in _rows(db, "SELECT rowid, embedding FROM chunk_vecs")}
    finally:
        db.close()
    return data


async def _copy(data: dict[str, Any], dsn: str, say: Say) -> None:
    import numpy as np

    store = PostgresStorage(dsn)
    try:
        async def q(c: Any) -> None:
            n = (await PostgresStorage._one(c, "SELECT count(*) FROM documents"))[0]
            if n:
                raise MigrateError(f"the target database already holds {n} documents:"
                                   " migrate into an empty one")
            meta = data["meta"]
            if data["vectors"]:
                await store._ensure_vectors(c, meta["embed_model"], int(meta["embed_dim"]),
                                            meta.get("embed_fingerprint", ""))
            async with c.cursor() as cur:
                await cur.executemany(
                    "INSERT INTO collections(id, name, path, pattern, include_by_default,"
                    " created_at, updated_at) VALUES (%s,%s,%s,%s,%s,%s,%s)",
                    [(r[0], r[1], r[2], r[3], bool(r[4]), r[5], r[6])
                     for r in data["collections"]])
                await cur.executemany(
                    "INSERT INTO documents(id, collection_id, path, title, body, metadata,"
                    " hash, created_at, modified_at) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s)",
                    data["documents"])
                vectors = data["vectors"]
                rows = [(*r[:6], bool(r[6]) and r[0] in vectors, r[7], r[8], r[9],
                         np.asarray(vectors[r[0]], np.float32) if r[0] in vectors else None)
                        for r in data["chunks"]]
                for start in range(0, len(rows), BATCH):
                    await cur.executemany(
                        "INSERT INTO chunks(id, document_id, collection_id, seq, text, tokens,"
                        " embedded, attempts, retry_at, last_error, embedding) VALUES"
                        " (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)", rows[start:start + BATCH])
                    say(f"  chunks {min(start + BATCH, len(rows))}/{len(rows)}")
            for table in ("collections", "documents", "chunks"):
                await c.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'),"
                                f" coalesce((SELECT max(id) FROM {table}), 0) + 1, false)")
        await store._write(q)
    finally:
        await store.close()


def migrate_to_postgres(sqlite_path: Path, dsn: str, say: Say = print) -> dict[str, int]:
    data = read_sqlite(sqlite_path)
    counts = {"collections": len(data["collections"]), "documents": len(data["documents"]),
              "chunks": len(data["chunks"]), "vectors": len(data["vectors"])}
    say(f"copying {counts['documents']} documents, {counts['chunks']} chunks and"
        f" {counts['vectors']} vectors from {sqlite_path}")
    asyncio.run(_copy(data, dsn, say))
    return counts
