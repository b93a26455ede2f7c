"""Reading the index: BM25 over documents, nearest chunks by vector, browsing.

Results use QMD's SearchResult shape. BM25 scores are normalised to [0, 1)
as |s| / (1 + |s|), the form QMD's strong-signal test expects.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from npuserve.daemon.index.store import IndexStore
from npuserve.daemon.models.vector_rows import le_bytes

_TERM = re.compile(r"[\w]+", re.UNICODE)


@dataclass
class Hit:
    doc_id: int
    score: float
    chunk_id: int | None = None  # the best chunk, for vector hits


_STOPWORDS = frozenset(
    "a an and are as at be by can do does for from how i in is it me my of on or the to what"
    " when where which who why with you your".split())


def terms_all(text: str) -> list[str]:
    """Every word of `text`, as FTS5's unicode61 tokenizer splits it (roughly)."""
    return _TERM.findall(text.lower())


def terms(text: str) -> list[str]:
    """The words of a search (at most 32): stop words dropped unless nothing else is left
    (in an OR query they would rank every document)."""
    words = [t for t in _TERM.findall(text.lower()) if t]
    content = [t for t in words if t not in _STOPWORDS]
    return (content or words)[:32]


def fts_query(text: str, any_term: bool = False) -> str | None:
    """User text as a safe FTS5 query: quoted terms, so no syntax can be injected."""
    words = terms(text)
    return (" OR " if any_term else " ").join(f'"{t}"' for t in words) if words else None


def _collection_clause(collection: str | None, alias: str = "d") -> tuple[str, tuple[Any, ...]]:
    if collection is None:
        return "", ()
    return (f" AND {alias}.collection_id = (SELECT id FROM collections WHERE name=?)",
            (collection,))


def bm25(store: IndexStore, text: str, limit: int, collection: str | None = None) -> list[Hit]:
    """All terms first; if that finds nothing, any term."""
    for any_term in (False, True):
        query = fts_query(text, any_term)
        if query is None:
            return []
        clause, args = _collection_clause(collection)
        sql = ("SELECT d.id, bm25(documents_fts, 2.0, 1.0) AS s FROM documents_fts"
               " JOIN documents d ON d.id = documents_fts.rowid"
               f" WHERE documents_fts MATCH ?{clause} ORDER BY s LIMIT ?")
        rows = store.db.read(lambda c, s=sql, q=query, a=args: c.execute(s, (q, *a, limit))
                             .fetchall())
        if rows:
            return [Hit(r[0], abs(r[1]) / (1.0 + abs(r[1]))) for r in rows]
    return []


def nearest(store: IndexStore, vector: memoryview | Sequence[float], limit: int,
            collection: str | None = None) -> list[Hit]:
    """Documents by their best chunk's cosine similarity."""
    if not store.db.has_vector_table():
        return []
    blob = le_bytes(vector)
    k = max(1, min(limit * 4, 4096))  # several chunks may belong to one document

    def q(c: Any) -> list[tuple[int, float, int]]:
        if collection is None:
            rows = c.execute("SELECT rowid, distance FROM chunk_vecs WHERE embedding MATCH ?"
                             " AND k = ?", (blob, k)).fetchall()
        else:
            cid = c.execute("SELECT id FROM collections WHERE name=?", (collection,)).fetchone()
            if cid is None:
                return []
            rows = c.execute("SELECT rowid, distance FROM chunk_vecs WHERE embedding MATCH ?"
                             " AND k = ? AND collection_id = ?", (blob, k, cid[0])).fetchall()
        out = []
        for chunk_id, distance in rows:
            doc = c.execute("SELECT document_id FROM chunks WHERE id=?", (chunk_id,)).fetchone()
            if doc:
                out.append((doc[0], 1.0 - distance, chunk_id))
        return out

    best: dict[int, Hit] = {}
    for doc_id, score, chunk_id in store.db.read(q):
        if doc_id not in best or score > best[doc_id].score:
            best[doc_id] = Hit(doc_id, score, chunk_id)
    return sorted(best.values(), key=lambda h: h.score, reverse=True)[:limit]


def results(store: IndexStore, hits: list[Hit], source: str, body_chars: int = 0
            ) -> list[dict[str, Any]]:
    """Hits as QMD SearchResults, in the hits' order; each body cut to `body_chars`
    (0: whole) in SQL, so eight 6 MB documents are not read whole to answer one search."""
    if not hits:
        return []
    ids = [h.doc_id for h in hits]
    marks = ",".join("?" * len(ids))
    body = "substr(d.body, 1, ?)" if body_chars else "d.body"
    sql = (f"SELECT d.id, c.name, d.path, d.title, d.hash, d.modified_at, {body},"
           " length(d.body) FROM documents d JOIN collections c ON c.id=d.collection_id"
           f" WHERE d.id IN ({marks})")
    args = ([body_chars] if body_chars else []) + ids
    rows = {r[0]: r for r in store.db.read(lambda c: c.execute(sql, args).fetchall())}
    return [result_row(rows[h.doc_id], h.score, source) for h in hits if h.doc_id in rows]


def result_row(r: Sequence[Any], score: float, source: str) -> dict[str, Any]:
    """A QMD SearchResult from (doc id, collection, path, title, hash, modified, body as
    cut, whole body length) - both index backends read these columns."""
    return {
        "filepath": f"qmd://{r[1]}/{r[2]}",
        "displayPath": f"{r[1]}/{r[2]}",
        "title": r[3],
        "hash": r[4],
        "docid": r[4][:6],
        "collectionName": r[1],
        "modifiedAt": r[5],
        "bodyLength": r[7],
        "body": r[6],
        "bodyTruncated": len(r[6]) < r[7],
        "context": None,
        "score": round(float(score), 6),
        "source": source,
    }


def chunk_texts(store: IndexStore, chunk_ids: list[int]) -> dict[int, str]:
    if not chunk_ids:
        return {}
    marks = ",".join("?" * len(chunk_ids))
    rows = store.db.read(lambda c: c.execute(
        f"SELECT id, text FROM chunks WHERE id IN ({marks})", chunk_ids).fetchall())
    return dict(rows)


def first_chunks(store: IndexStore, doc_ids: list[int]) -> dict[int, tuple[int, str]]:
    """The first chunk of each document (for BM25-only hits that need a rerank text)."""
    if not doc_ids:
        return {}
    marks = ",".join("?" * len(doc_ids))
    rows = store.db.read(lambda c: c.execute(
        f"SELECT document_id, id, text FROM chunks WHERE seq=0 AND document_id IN ({marks})",
        doc_ids).fetchall())
    return {r[0]: (r[1], r[2]) for r in rows}


def browse(store: IndexStore, limit: int, offset: int, collection: str | None
           ) -> tuple[list[dict[str, Any]], int]:
    clause, args = _collection_clause(collection)
    where = " WHERE 1=1" + clause

    def q(c: Any) -> tuple[list[Any], int]:
        total = c.execute(f"SELECT count(*) FROM documents d{where}", args).fetchone()[0]
        rows = c.execute(
            "SELECT d.hash, substr(d.body, 1, 500), d.created_at, c.name, d.path, d.title"
            f" FROM documents d JOIN collections c ON c.id=d.collection_id{where}"
            " ORDER BY d.modified_at DESC, d.id DESC LIMIT ? OFFSET ?",
            (*args, limit, offset)).fetchall()
        return rows, total

    rows, total = store.db.read(q)
    chunks = [{"hash": r[0], "snippet": r[1], "created_at": r[2], "collection": r[3],
               "path": r[4], "title": r[5]} for r in rows]
    return chunks, total
