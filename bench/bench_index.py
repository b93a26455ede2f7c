"""Index benchmark: ingest throughput, query latency at 1k and 10k chunks, and
vector search cost growth from 10k to 100k vectors.

Ingest and queries go through a real daemon over HTTP (embedding included);
the 100k-vector figure uses the index's own vec0 table with random unit
vectors, since embedding 100k chunks here would take most of an hour.

Usage: python bench/bench_index.py [--state-dir DIR] [--chunk-tokens 128]
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_core import post, start_daemon  # noqa: E402

VOCAB = ("package kernel module network socket process memory file system disk archive "
         "compress search index vector query token model embed rerank device thread queue "
         "schedule timeout retry service unit journal config permission user group").split()


def document(i: int, words: int) -> str:
    rng = np.random.default_rng(i)
    body = " ".join(VOCAB[j] for j in rng.integers(0, len(VOCAB), words))
    return f"# Document {i}\n\n{body}."


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=600) as resp:
        return json.load(resp)


def median_ms(fn, n: int = 15) -> float:  # noqa: ANN001
    times = []
    for i in range(n):
        start = time.perf_counter()
        fn(i)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def ingest_and_query(models_dir: Path, chunks_wanted: int, chunk_tokens: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp) / "state"
        state.mkdir()
        (state / "models").symlink_to(models_dir)
        proc, base = start_daemon(state, [f"index.chunk_tokens={chunk_tokens}",
                                          "models.expand.max_tokens=48",
                                          "scheduler.keep_alive=-1"])
        try:
            post(base + "/collections", {"name": "bench"})
            # One document per chunk: ~chunk_tokens words stays within one chunk.
            words = max(8, int(chunk_tokens * 0.6))
            start = time.perf_counter()
            for first in range(0, chunks_wanted, 64):
                docs = [{"path": f"d/{i}.md", "body": document(i, words)}
                        for i in range(first, min(chunks_wanted, first + 64))]
                post(f"{base}/collections/bench/documents", {"documents": docs})
            stored = time.perf_counter() - start
            while get(base + "/status")["needsEmbedding"]:
                time.sleep(0.5)
            total = time.perf_counter() - start
            qs = [" ".join(VOCAB[(i * 3 + k) % len(VOCAB)] for k in range(3)) for i in range(50)]
            search = median_ms(lambda i: get(f"{base}/search?q={urllib.parse.quote(qs[i])}"))
            vsearch = median_ms(lambda i: post(base + "/vsearch", {"query": qs[i]}))
            hybrid = median_ms(lambda i: post(base + "/query", {"query": qs[i]}), n=5)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    return {"chunks": chunks_wanted, "store_s": stored, "ingest_s": total,
            "chunks_per_s": chunks_wanted / total, "search_ms": search,
            "vsearch_ms": vsearch, "query_ms": hybrid}


def vector_growth(dim: int = 384) -> tuple[float, float]:
    """Median vec0 KNN (k=80) latency at 10k and at 100k vectors, in ms."""
    from npuserve.daemon.index.db import IndexDB

    rng = np.random.default_rng(0)
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        db = IndexDB(Path(tmp) / "v.sqlite")
        with db.transaction() as c:
            db.ensure_vector_table(c, "random", dim)
        inserted = 0
        for target in (10_000, 100_000):
            with db.transaction() as c:
                while inserted < target:
                    v = rng.standard_normal(dim).astype(np.float32)
                    v /= np.linalg.norm(v)
                    inserted += 1
                    c.execute("INSERT INTO chunk_vecs(rowid, collection_id, embedding)"
                              " VALUES (?, 1, ?)", (inserted, v.tobytes()))
            queries = rng.standard_normal((15, dim)).astype(np.float32)

            def knn(i: int, queries: np.ndarray = queries) -> None:
                db.read(lambda c: c.execute(
                    "SELECT rowid, distance FROM chunk_vecs WHERE embedding MATCH ? AND k = 80",
                    (queries[i].tobytes(),)).fetchall())

            out.append(median_ms(knn))
        db.close()
    return out[0], out[1]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--state-dir", default=None)
    ap.add_argument("--chunk-tokens", type=int, default=128)
    ap.add_argument("--sizes", default="1000,10000")
    args = ap.parse_args()
    from npuserve.daemon.config import load_config

    cfg = load_config(None, overrides={"state_dir": args.state_dir} if args.state_dir else {})
    for n in (int(x) for x in args.sizes.split(",")):
        r = ingest_and_query(cfg.models_dir, n, args.chunk_tokens)
        print(f"{r['chunks']:>6} chunks: stored in {r['store_s']:.1f}s, searchable by vector"
              f" after {r['ingest_s']:.1f}s ({r['chunks_per_s']:.1f} chunks/s);"
              f" /search {r['search_ms']:.1f} ms, /vsearch {r['vsearch_ms']:.1f} ms,"
              f" /query {r['query_ms']:.0f} ms (medians)", flush=True)
    small, large = vector_growth()
    print(f"vec0 KNN k=80, 384-d: {small:.1f} ms at 10k, {large:.1f} ms at 100k vectors;"
          f" cost growth 10k -> 100k = {large / small:.1f}x (data grew 10x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
