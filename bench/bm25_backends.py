"""BM25 on the two index backends, one corpus: FTS5 (SQLite, porter stemming) against
npuserve's BM25 over PostgreSQL's tsvector (English stemming and stop words), on the
standard library's documentation (131 pydoc pages) and the questions of
bench/stdlib_corpus.py. Prints recall@1 and @5 of each (the page that answers the
question), how often their top results agree, and the median latency of a search.

Usage: python bench/bm25_backends.py
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stdlib_corpus import QUESTIONS, documents  # noqa: E402


async def run(store: object, docs: list[dict]) -> tuple[list[list[str]], list[float]]:
    from npuserve.daemon.index.store import content_hash

    await store.create_collection("stdlib", "", "", True)  # type: ignore[attr-defined]
    for doc in docs:
        doc["hash"] = content_hash(doc["title"], doc["body"])
    await store.put_documents("stdlib", docs, [[] for _ in docs])  # type: ignore[attr-defined]
    ranked, times = [], []
    for question, _ in QUESTIONS:
        start = time.perf_counter()
        hits = await store.bm25(question, 10, None)  # type: ignore[attr-defined]
        results = await store.results(hits, "fts")  # type: ignore[attr-defined]
        times.append(time.perf_counter() - start)
        ranked.append([r["displayPath"].split("/", 1)[1][:-4] for r in results])
    await store.close()  # type: ignore[attr-defined]
    return ranked, times


def main() -> int:
    import pgserver

    from npuserve.daemon.index.pg_storage import PostgresStorage
    from npuserve.daemon.index.storage import SqliteStorage

    docs = documents()
    with tempfile.TemporaryDirectory() as tmp:
        server = pgserver.get_server(Path(tmp) / "pg", cleanup_mode="stop")
        try:
            server.psql("CREATE DATABASE bm25;")
            lite, lite_t = asyncio.run(run(SqliteStorage(Path(tmp) / "i.sqlite"),
                                           [dict(d) for d in docs]))
            pg, pg_t = asyncio.run(run(PostgresStorage(server.get_uri("bm25")),
                                       [dict(d) for d in docs]))
        finally:
            server.cleanup()
    answers = [module for _, module in QUESTIONS]
    for name, ranked, times in (("FTS5 (SQLite)", lite, lite_t),
                                ("BM25 on tsvector (PostgreSQL)", pg, pg_t)):
        at1 = sum(r[:1] == [a] for r, a in zip(ranked, answers, strict=True))
        at5 = sum(a in r[:5] for r, a in zip(ranked, answers, strict=True))
        print(f"{name:32} recall@1 {at1}/{len(answers)}, @5 {at5}/{len(answers)},"
              f" median {statistics.median(times) * 1e3:.1f} ms")
    same1 = sum(a[:1] == b[:1] for a, b in zip(lite, pg, strict=True))
    overlap = statistics.mean(len(set(a[:10]) & set(b[:10])) / max(1, len(set(a[:10])))
                              for a, b in zip(lite, pg, strict=True))
    print(f"same top result {same1}/{len(answers)}; top-10 overlap {overlap:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
