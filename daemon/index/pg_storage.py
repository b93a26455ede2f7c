"""The index on PostgreSQL + pgvector: several boards share one corpus.

The same `IndexStorage` as SQLite's, on psycopg 3's async connections: one for writes
(each call one transaction: all or nothing) and one for reads, each used by one call at a
time. Full text is PostgreSQL's own: a stored `tsvector` column (title weighted A, body
B, English stemming) under a GIN index finds the matches, ranked by BM25 as FTS5 computes
it, from the tsvector's positions (scores in FTS5's [0, 1) form). Vectors are a
`vector(dim)` column of the chunks under an HNSW index (cosine), made when the first vector
arrives.

Boards pointed at one database share the embedding backlog: `pending_chunks` claims its
batch (`FOR UPDATE SKIP LOCKED`, then a lease of index.claim_seconds), so no two daemons embed
the same chunk, and a daemon killed mid-batch leaves its claim to lapse and be taken by
another. Vectors of another embedding model (fingerprint) are refused as on SQLite.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from npuserve.daemon.errors import IndexError_, StorageError
from npuserve.daemon.index.db import VectorsMismatch
from npuserve.daemon.index.search import Hit, result_row, terms, terms_all
from npuserve.daemon.index.storage import IndexStorage, Vector
from npuserve.daemon.index.store import StoredDoc, check_collection_name, now_iso
from npuserve.daemon.models.vector_rows import VectorRows

log = logging.getLogger("npuserve.index")
T = TypeVar("T")

SCHEMA_VERSION = 1
# Each ingest that adds chunks notifies this channel (at commit): the other daemons' embedders
# wake at once instead of at their next poll.
CHANNEL = "npuserve_backlog"
K1, B = 1.2, 0.75  # FTS5's BM25 constants
TITLE_WEIGHT = 2.0  # bm25(documents_fts, 2.0, 1.0) on SQLite
# Matches ranked by BM25: at most this many, the best of them by ts_rank_cd first.
BM25_CANDIDATES = 1000
HNSW_EF_CONSTRUCTION = 128  # pgvector's 64 held recall@10 at 1M vectors to ~0.93
# PostgreSQL refuses a tsvector over 1 MB: the full-text column reads this much of a body
# (the whole body is stored, chunked and embedded).
FTS_CHARS = 400_000
_META = "npuserve_meta"

MIGRATIONS: list[list[str]] = [[
    "CREATE EXTENSION IF NOT EXISTS vector",
    f"CREATE TABLE IF NOT EXISTS {_META}(key text PRIMARY KEY, value text NOT NULL)",
    """CREATE TABLE collections(
        id bigserial PRIMARY KEY, name text NOT NULL UNIQUE, path text NOT NULL DEFAULT '',
        pattern text NOT NULL DEFAULT '**/*.md', include_by_default boolean NOT NULL DEFAULT
        true, created_at text NOT NULL, updated_at text NOT NULL)""",
    f"""CREATE TABLE documents(
        id bigserial PRIMARY KEY,
        collection_id bigint NOT NULL REFERENCES collections(id) ON DELETE CASCADE,
        path text NOT NULL, title text NOT NULL, body text NOT NULL,
        metadata text NOT NULL DEFAULT '{{}}', hash text NOT NULL,
        created_at text NOT NULL, modified_at text NOT NULL,
        doc_len integer NOT NULL DEFAULT 0,
        tsv tsvector GENERATED ALWAYS AS (
            setweight(to_tsvector('english', title), 'A') ||
            setweight(to_tsvector('english', left(body, {FTS_CHARS})), 'B')) STORED,
        UNIQUE(collection_id, path))""",
    "CREATE INDEX documents_tsv ON documents USING gin(tsv)",
    """CREATE TABLE chunks(
        id bigserial PRIMARY KEY,
        document_id bigint NOT NULL REFERENCES documents(id) ON DELETE CASCADE,
        collection_id bigint NOT NULL, seq integer NOT NULL, text text NOT NULL,
        tokens integer NOT NULL, embedded boolean NOT NULL DEFAULT false,
        attempts integer NOT NULL DEFAULT 0, retry_at double precision NOT NULL DEFAULT 0,
        claimed_until double precision NOT NULL DEFAULT 0, last_error text,
        embedding vector)""",
    "CREATE INDEX chunks_pending ON chunks(id) WHERE NOT embedded",
    "CREATE INDEX chunks_document ON chunks(document_id)",
]]


def _doc_len(doc: dict[str, Any]) -> int:
    """Words in the title and the indexed part of the body (BM25's document length)."""
    return len(terms_all(doc["title"])) + len(terms_all(doc["body"][:FTS_CHARS]))


def _idf(n_docs: int, df: int) -> float:
    """FTS5's idf: log((N - n + 0.5) / (n + 0.5)), at least 1e-6 (a term in most
    documents still counts a little)."""
    return max(1e-6, math.log((n_docs - df + 0.5) / (df + 0.5)))


def _tsquery(text: str, any_term: bool) -> str | None:
    """User text as a tsquery of plain words (no operator can be injected)."""
    words = terms(text)
    return (" | " if any_term else " & ").join(words) if words else None


def storage_error(exc: BaseException) -> StorageError | None:
    """The client-facing form of a database failure the client cannot fix."""
    import psycopg

    if isinstance(exc, psycopg.errors.DiskFull):
        return StorageError("the disk holding the index is full; nothing was stored", 507)
    if isinstance(exc, psycopg.errors.ReadOnlySqlTransaction):
        return StorageError("the index database is read-only now; nothing was stored", 503)
    if isinstance(exc, psycopg.OperationalError):
        return StorageError(f"the index database is unreachable ({type(exc).__name__});"
                            " nothing was stored", 503)
    return None


class PostgresStorage(IndexStorage):
    def __init__(self, dsn: str, claim_seconds: float = 120.0) -> None:
        self.dsn = dsn
        # A claimed batch not written back within this is taken by another daemon.
        self.claim_seconds = claim_seconds
        self._conns: dict[str, Any] = {}
        self._locks = {"read": asyncio.Lock(), "write": asyncio.Lock()}
        self._dim: int | None = None

    @property
    def readonly(self) -> bool:
        return False

    # --- connections --------------------------------------------------------------------

    async def _connection(self, kind: str) -> Any:
        import psycopg
        from pgvector.psycopg import register_vector_async

        conn = self._conns.get(kind)
        if conn is not None and not conn.closed:
            return conn
        conn = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True)
        if not self._conns:
            await self._migrate(conn)
        await register_vector_async(conn)
        self._conns[kind] = conn
        return conn

    async def _migrate(self, conn: Any) -> None:
        # One daemon migrates at a time; the others wait on the lock, then find it done.
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext('npuserve-migrate'))")
            await conn.execute(f"CREATE TABLE IF NOT EXISTS {_META}(key text PRIMARY KEY,"
                               " value text NOT NULL)")
            row = await (await conn.execute(
                f"SELECT value FROM {_META} WHERE key='schema_version'")).fetchone()
            version = int(row[0]) if row else 0
            if version > SCHEMA_VERSION:
                raise RuntimeError(f"the index database has schema {version}, newer than"
                                   f" this npuserve ({SCHEMA_VERSION})")
            for target in range(version + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[target - 1]:
                    await conn.execute(statement)
                await conn.execute(f"INSERT INTO {_META} VALUES ('schema_version', %s) ON"
                                   " CONFLICT (key) DO UPDATE SET value=excluded.value",
                                   (str(target),))
                log.info("index database migrated to schema %d", target)

    async def _read(self, fn: Callable[[Any], Awaitable[T]]) -> T:
        async with self._locks["read"]:
            try:
                return await fn(await self._connection("read"))
            except Exception as exc:
                raise self._translated(exc, "read") from exc

    async def _write(self, fn: Callable[[Any], Awaitable[T]]) -> T:
        """`fn` in one transaction: all of it is committed, or none."""
        async with self._locks["write"]:
            conn = await self._connection("write")
            try:
                async with conn.transaction():
                    return await fn(conn)
            except Exception as exc:
                raise self._translated(exc, "write") from exc

    def _translated(self, exc: Exception, kind: str) -> Exception:
        translated = storage_error(exc)
        if translated is None:
            return exc
        log.error("index database %s failed: %s", kind, exc)
        conn = self._conns.pop(kind, None)  # reconnect on the next call
        if conn is not None and not conn.closed:
            asyncio.ensure_future(conn.close())
        return translated

    @staticmethod
    async def _all(conn: Any, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        return await (await conn.execute(sql, args)).fetchall()

    @staticmethod
    async def _one(conn: Any, sql: str, args: Sequence[Any] = ()) -> Any:
        return await (await conn.execute(sql, args)).fetchone()

    async def _collection_id(self, conn: Any, name: str) -> int:
        row = await self._one(conn, "SELECT id FROM collections WHERE name=%s", (name,))
        if row is None:
            raise IndexError_(f"no collection named {name!r}", status=404)
        return int(row[0])

    # --- collections ----------------------------------------------------------------------

    async def create_collection(self, name: str, path: str, pattern: str,
                                include: bool) -> bool:
        check_collection_name(name)
        ts = now_iso()

        async def q(c: Any) -> bool:
            row = await self._one(
                c, "INSERT INTO collections(name, path, pattern, include_by_default,"
                " created_at, updated_at) VALUES (%s,%s,%s,%s,%s,%s) ON CONFLICT (name) DO"
                " UPDATE SET path=excluded.path, pattern=excluded.pattern,"
                " include_by_default=excluded.include_by_default,"
                " updated_at=excluded.updated_at RETURNING (xmax = 0)",
                (name, path, pattern, include, ts, ts))
            return bool(row[0])  # xmax 0: inserted, not updated
        return await self._write(q)

    async def delete_collection(self, name: str) -> int:
        async def q(c: Any) -> int:
            cid = await self._collection_id(c, name)
            n = (await self._one(c, "SELECT count(*) FROM documents WHERE collection_id=%s",
                                 (cid,)))[0]
            await c.execute("DELETE FROM collections WHERE id=%s", (cid,))
            return int(n)
        return await self._write(q)

    async def collections(self) -> list[dict[str, Any]]:
        rows = await self._read(lambda c: self._all(c, """
            SELECT c.name, c.path, c.pattern, c.include_by_default, c.updated_at,
                   count(d.id), max(d.modified_at)
            FROM collections c LEFT JOIN documents d ON d.collection_id=c.id
            GROUP BY c.id ORDER BY c.name"""))
        return [{"name": r[0], "path": r[1], "pattern": r[2], "include_by_default": r[3],
                 "documents": r[5], "last_modified": r[6] or r[4]} for r in rows]

    # --- documents --------------------------------------------------------------------------

    async def unchanged(self, collection: str, path: str, content_hash: str) -> bool:
        row = await self._read(lambda c: self._one(
            c, "SELECT d.hash FROM documents d JOIN collections c ON c.id=d.collection_id"
            " WHERE c.name=%s AND d.path=%s", (collection, path)))
        return bool(row and row[0] == content_hash)

    async def put_documents(self, collection: str, docs: list[dict[str, Any]],
                            chunks: list[list[tuple[str, int]]]) -> list[StoredDoc]:
        ts = now_iso()

        async def q(c: Any) -> list[StoredDoc]:
            cid = await self._collection_id(c, collection)
            return [await self._put_one(c, cid, doc, doc_chunks, ts)
                    for doc, doc_chunks in zip(docs, chunks, strict=True)]
        return await self._write(q)

    async def _put_one(self, c: Any, cid: int, doc: dict[str, Any],
                       chunks: list[tuple[str, int]], ts: str) -> StoredDoc:
        h = doc["hash"]
        meta = json.dumps(doc.get("metadata") or {}, ensure_ascii=False)
        row = await self._one(c, "SELECT id, hash FROM documents WHERE collection_id=%s AND"
                              " path=%s FOR UPDATE", (cid, doc["path"]))
        if row and row[1] == h:
            await c.execute("UPDATE documents SET metadata=%s WHERE id=%s", (meta, row[0]))
            n = await self._one(c, "SELECT count(*) FROM chunks WHERE document_id=%s",
                                (row[0],))
            return StoredDoc("unchanged", h, int(n[0]))
        if row:
            await c.execute("DELETE FROM chunks WHERE document_id=%s", (row[0],))
            await c.execute("UPDATE documents SET title=%s, body=%s, metadata=%s, hash=%s,"
                            " modified_at=%s, doc_len=%s WHERE id=%s",
                            (doc["title"], doc["body"], meta, h, ts, _doc_len(doc), row[0]))
            doc_id, status = row[0], "replaced"
        else:
            new = await self._one(
                c, "INSERT INTO documents(collection_id, path, title, body, metadata, hash,"
                " created_at, modified_at, doc_len) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s)"
                " RETURNING id",
                (cid, doc["path"], doc["title"], doc["body"], meta, h, ts, ts, _doc_len(doc)))
            doc_id, status = new[0], "created"
        if chunks:
            await c.execute(f"NOTIFY {CHANNEL}")  # delivered at commit, once per transaction
            async with c.cursor() as cur:
                await cur.executemany(
                    "INSERT INTO chunks(document_id, collection_id, seq, text, tokens)"
                    " VALUES (%s,%s,%s,%s,%s)",
                    [(doc_id, cid, seq, text, tokens)
                     for seq, (text, tokens) in enumerate(chunks)])
        return StoredDoc(status, h, len(chunks))

    async def get_document(self, collection: str, path: str) -> dict[str, Any]:
        async def q(c: Any) -> Any:
            cid = await self._collection_id(c, collection)
            return await self._one(
                c, "SELECT d.path, d.title, d.body, d.metadata, d.hash, d.created_at,"
                " d.modified_at, (SELECT count(*) FROM chunks WHERE document_id=d.id),"
                " (SELECT count(*) FROM chunks WHERE document_id=d.id AND embedded)"
                " FROM documents d WHERE d.collection_id=%s AND d.path=%s", (cid, path))
        row = await self._read(q)
        if row is None:
            raise IndexError_(f"no document {path!r} in {collection!r}", status=404)
        return {"path": row[0], "title": row[1], "body": row[2], "metadata": json.loads(row[3]),
                "hash": row[4], "createdAt": row[5], "modifiedAt": row[6], "chunks": row[7],
                "embeddedChunks": row[8]}

    async def delete_document(self, collection: str, path: str) -> None:
        async def q(c: Any) -> None:
            cid = await self._collection_id(c, collection)
            row = await self._one(c, "DELETE FROM documents WHERE collection_id=%s AND path=%s"
                                  " RETURNING id", (cid, path))
            if row is None:
                raise IndexError_(f"no document {path!r} in {collection!r}", status=404)
        await self._write(q)

    async def counts(self) -> tuple[int, int]:
        async def q(c: Any) -> tuple[int, int]:
            total = (await self._one(c, "SELECT count(*) FROM documents"))[0]
            pending = (await self._one(c, "SELECT count(DISTINCT document_id) FROM chunks"
                                          " WHERE NOT embedded"))[0]
            return int(total), int(pending)
        return await self._read(q)

    async def report(self) -> dict[str, Any]:
        """The HNSW index's size against shared_buffers: an index that does not fit is read
        through the OS cache, page by page (bench/vector_backends.py, 1M vectors: median
        2.0 vs 1.1 ms, p95 5.7 vs 2.1 ms at 128 MB vs enough)."""
        row = await self._read(lambda c: self._one(
            c, "SELECT coalesce(pg_relation_size(to_regclass('chunks_hnsw')), 0),"
               " pg_size_bytes(current_setting('shared_buffers'))"))
        index_bytes, buffers = int(row[0]), int(row[1])
        return {"backend": "postgres", "vectorIndexBytes": index_bytes,
                "sharedBuffersBytes": buffers, "warning": buffers_warning(index_bytes, buffers)}

    # --- the embedding backlog, shared by every daemon on this database ------------------------

    async def pending_chunks(self, limit: int) -> list[tuple[int, int, str, str]]:
        """Claims up to `limit` chunks for this daemon (no other daemon takes them until
        the claim lapses) and returns them."""
        now = time.time()

        async def q(c: Any) -> list[Any]:
            return await self._all(c, """
                WITH due AS (
                    SELECT id FROM chunks
                    WHERE NOT embedded AND retry_at <= %s AND claimed_until <= %s
                    ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED)
                UPDATE chunks ch SET claimed_until = %s FROM due, documents d
                WHERE ch.id = due.id AND d.id = ch.document_id
                RETURNING ch.id, ch.collection_id, d.title, ch.text""",
                (now, now, limit, now + self.claim_seconds))
        rows = await self._write(q)
        return sorted((int(r[0]), int(r[1]), r[2], r[3]) for r in rows)

    async def store_vectors(self, ids: list[int], collection_ids: list[int],
                            vectors: VectorRows, model: str, fingerprint: str) -> int:
        import numpy as np

        dim = int(vectors.shape[1])
        rows = np.asarray(vectors, dtype=np.float32)

        async def q(c: Any) -> int:
            await self._ensure_vectors(c, model, dim, fingerprint)
            written = 0
            for chunk_id, vec in zip(ids, rows, strict=True):
                done = await self._one(
                    c, "UPDATE chunks SET embedding=%s, embedded=true, last_error=NULL,"
                    " claimed_until=0 WHERE id=%s AND NOT embedded RETURNING id",
                    (vec, chunk_id))
                written += done is not None
            return written
        return await self._write(q)

    async def _ensure_vectors(self, c: Any, model: str, dim: int, fingerprint: str) -> None:
        """The vector column typed and indexed on first use; another model refused."""
        await c.execute("SELECT pg_advisory_xact_lock(hashtext('npuserve-vectors'))")
        meta = dict(await self._all(
            c, f"SELECT key, value FROM {_META} WHERE key IN ('embed_model', 'embed_dim',"
            " 'embed_fingerprint')"))
        if not meta:
            await c.execute(f"ALTER TABLE chunks ALTER COLUMN embedding TYPE vector({dim})")
            # ef_construction 128, not pgvector's 64: at 1M vectors the default graph held
            # recall@10 to 0.93-0.95 at any ef_search (bench/vector_backends.py).
            await c.execute("CREATE INDEX IF NOT EXISTS chunks_hnsw ON chunks USING"
                            " hnsw (embedding vector_cosine_ops) WITH (m = 16,"
                            f" ef_construction = {HNSW_EF_CONSTRUCTION})")
            for key, value in (("embed_model", model), ("embed_dim", str(dim)),
                               ("embed_fingerprint", fingerprint)):
                await c.execute(f"INSERT INTO {_META} VALUES (%s, %s)", (key, value))
            return
        if meta.get("embed_fingerprint") != fingerprint or meta.get("embed_dim") != str(dim):
            raise VectorsMismatch(
                f"the index holds vectors of {meta.get('embed_model')}"
                f" ({meta.get('embed_fingerprint')}, {meta.get('embed_dim')}-d); this daemon"
                f" embeds with {model} ({fingerprint}, {dim}-d): the boards sharing this"
                " database must use the same embedding model")

    async def embedding_failed(self, ids: list[int], error: str, backoff: float) -> None:
        async def q(c: Any) -> None:
            await c.execute("UPDATE chunks SET attempts=attempts+1, last_error=%s,"
                            " retry_at=%s, claimed_until=0 WHERE id = ANY(%s)",
                            (error[:500], time.time() + backoff, ids))
        await self._write(q)

    async def watch_backlog(self, wake: Callable[[], None]) -> None:
        import psycopg

        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True)
                async with conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    wake()  # anything added while this daemon was not listening
                    async for _ in conn.notifies():
                        wake()
            except psycopg.OperationalError as exc:
                log.warning("index database: listening for the shared backlog failed (%s);"
                            " again in 10 s", exc)
                await asyncio.sleep(10)

    async def release_chunks(self, ids: list[int]) -> None:
        async def q(c: Any) -> None:
            await c.execute("UPDATE chunks SET claimed_until=0 WHERE id = ANY(%s)", (ids,))
        await self._write(q)

    async def vector_model(self) -> tuple[str | None, int | None, str | None]:
        rows = dict(await self._read(lambda c: self._all(
            c, f"SELECT key, value FROM {_META} WHERE key IN ('embed_model', 'embed_dim',"
            " 'embed_fingerprint')")))
        dim = rows.get("embed_dim")
        return rows.get("embed_model"), int(dim) if dim else None, rows.get("embed_fingerprint")

    async def has_vectors(self) -> bool:
        return (await self.vector_model())[1] is not None

    # --- search ----------------------------------------------------------------------------

    async def bm25(self, text: str, limit: int, collection: str | None) -> list[Hit]:
        """All terms first; if that finds nothing, any term (as on SQLite)."""
        for any_term in (False, True):
            query = _tsquery(text, any_term)
            if query is None:
                return []
            scored = await self._read(lambda c, q=query: self._bm25(c, q, text, collection))
            if scored:
                best = sorted(scored.items(), key=lambda kv: (-kv[1], kv[0]))[:limit]
                return [Hit(doc, score / (1.0 + score)) for doc, score in best]
        return []

    async def _bm25(self, c: Any, query: str, text: str, collection: str | None
                    ) -> dict[int, float]:
        """BM25 of the documents matching `query` (a tsquery), FTS5's formula."""
        clause = " AND d.collection_id = (SELECT id FROM collections WHERE name=%s)" \
            if collection is not None else ""
        args: tuple[Any, ...] = (query, *((collection,) if collection else ()),
                                 BM25_CANDIDATES)
        candidates = await self._all(
            c, f"SELECT d.id, d.doc_len FROM documents d, to_tsquery('english', %s) q"
            f" WHERE d.tsv @@ q{clause} ORDER BY ts_rank_cd(d.tsv, q) DESC LIMIT %s", args)
        if not candidates:
            return {}
        lexemes = [r[0] for r in await self._all(
            c, "SELECT DISTINCT unnest(tsvector_to_array(to_tsvector('english', %s)))",
            (" ".join(terms(text)),))]
        n_docs, avg_len = await self._one(c, "SELECT count(*), coalesce(avg(doc_len), 0)"
                                             " FROM documents")
        df = dict(await self._all(
            c, "SELECT l, (SELECT count(*) FROM documents WHERE tsv @@ quote_literal(l)::"
            "tsquery) FROM unnest(%s::text[]) l", (lexemes,)))
        tf = await self._all(
            c, "SELECT d.id, u.lexeme, u.weights FROM documents d, unnest(d.tsv) u"
            " WHERE d.id = ANY(%s) AND u.lexeme = ANY(%s)",
            ([r[0] for r in candidates], lexemes))
        lengths = {int(r[0]): int(r[1]) for r in candidates}
        scores = dict.fromkeys(lengths, 0.0)
        for doc, lexeme, weights in tf:
            freq = sum(TITLE_WEIGHT if w == "A" else 1.0 for w in weights)
            scores[doc] += _idf(int(n_docs), int(df.get(lexeme, 0))) * freq * (K1 + 1) / (
                freq + K1 * (1 - B + B * lengths[doc] / max(float(avg_len), 1.0)))
        return scores

    async def nearest(self, vector: Vector, limit: int, collection: str | None
                      ) -> list[Hit]:
        import numpy as np

        if not await self.has_vectors():
            return []
        vec = np.asarray(vector, dtype=np.float32)
        k = max(1, min(limit * 4, 1000))  # several chunks may belong to one document

        async def q(c: Any) -> list[Any]:
            async with c.transaction():
                # The HNSW scan looks at ef_search candidates (100: recall@10 0.99 at 100k
                # vectors where pgvector's default 40 gave 0.97, at no measurable cost:
                # bench/vector_backends.py); with a collection filter it goes on scanning
                # until k rows pass (pgvector 0.8's iterative scan).
                await c.execute(f"SET LOCAL hnsw.ef_search = {max(100, k)}")
                await c.execute("SET LOCAL hnsw.iterative_scan = relaxed_order")
                where = "embedded"
                args: list[Any] = [vec]
                if collection is not None:
                    where += " AND collection_id = (SELECT id FROM collections WHERE name=%s)"
                    args.append(collection)
                return await self._all(
                    c, f"SELECT id, document_id, embedding <=> %s AS d FROM chunks WHERE"
                    f" {where} ORDER BY d LIMIT {k}", args)
        best: dict[int, Hit] = {}
        for chunk_id, doc_id, distance in await self._read(q):
            score = 1.0 - float(distance)
            if doc_id not in best or score > best[doc_id].score:
                best[doc_id] = Hit(int(doc_id), score, int(chunk_id))
        return sorted(best.values(), key=lambda h: h.score, reverse=True)[:limit]

    async def results(self, hits: list[Hit], source: str, body_chars: int = 0
                      ) -> list[dict[str, Any]]:
        if not hits:
            return []
        body = "left(d.body, %s)" if body_chars else "d.body"
        args: list[Any] = ([body_chars] if body_chars else []) + [[h.doc_id for h in hits]]
        rows = {r[0]: r for r in await self._read(lambda c: self._all(
            c, f"SELECT d.id, c.name, d.path, d.title, d.hash, d.modified_at, {body},"
            " length(d.body) FROM documents d JOIN collections c ON c.id=d.collection_id"
            " WHERE d.id = ANY(%s)", args))}
        return [result_row(rows[h.doc_id], h.score, source) for h in hits if h.doc_id in rows]

    async def chunk_texts(self, chunk_ids: list[int]) -> dict[int, str]:
        if not chunk_ids:
            return {}
        rows = await self._read(lambda c: self._all(
            c, "SELECT id, text FROM chunks WHERE id = ANY(%s)", (chunk_ids,)))
        return {int(r[0]): r[1] for r in rows}

    async def first_chunks(self, doc_ids: list[int]) -> dict[int, tuple[int, str]]:
        if not doc_ids:
            return {}
        rows = await self._read(lambda c: self._all(
            c, "SELECT document_id, id, text FROM chunks WHERE seq=0 AND"
            " document_id = ANY(%s)", (doc_ids,)))
        return {int(r[0]): (int(r[1]), r[2]) for r in rows}

    async def browse(self, limit: int, offset: int, collection: str | None
                     ) -> tuple[list[dict[str, Any]], int]:
        where = " WHERE d.collection_id = (SELECT id FROM collections WHERE name=%s)" \
            if collection is not None else ""
        args: tuple[Any, ...] = (collection,) if collection is not None else ()

        async def q(c: Any) -> tuple[list[Any], int]:
            total = (await self._one(c, f"SELECT count(*) FROM documents d{where}", args))[0]
            rows = await self._all(
                c, "SELECT d.hash, left(d.body, 500), d.created_at, c.name, d.path, d.title"
                f" FROM documents d JOIN collections c ON c.id=d.collection_id{where}"
                " ORDER BY d.modified_at DESC, d.id DESC LIMIT %s OFFSET %s",
                (*args, limit, offset))
            return rows, int(total)
        rows, total = await self._read(q)
        return ([{"hash": r[0], "snippet": r[1], "created_at": r[2], "collection": r[3],
                  "path": r[4], "title": r[5]} for r in rows], total)

    async def close(self) -> None:
        for conn in self._conns.values():
            await conn.close()
        self._conns = {}


def buffers_warning(index_bytes: int, buffers: int) -> str | None:
    """Why searches will be slow, or None: the vector index larger than shared_buffers."""
    if index_bytes <= buffers:
        return None
    return (f"the vector index ({index_bytes / 2**20:.0f} MB) is larger than the database's"
            f" shared_buffers ({buffers / 2**20:.0f} MB): vector searches read it from the"
            " OS cache page by page; raise shared_buffers in postgresql.conf to at least"
            f" {index_bytes * 5 // 4 / 2**20:.0f} MB (README: several boards, one index)")

