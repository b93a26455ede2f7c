"""Several boards, one index: two real daemons (processes) on one PostgreSQL + pgvector
server share the corpus and its embedding backlog; killing one mid-batch loses nothing."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from .conftest import http_json, rerank_gguf, start_daemon, wait_http
from .gguf_builders import LAST_POOLING, tiny_qwen3
from .pg_support import fresh_database, pg_server  # noqa: F401 - the fixture

pytestmark = pytest.mark.slow

WORDS = ("scheduler queue board npu embedding rerank corpus vector index query daemon lan"
         " model swap batch latency memory thread core kernel driver runtime chunk").split()


def note(i: int) -> str:
    """A document of ~20 chunks of 32 tokens, each paragraph its own words."""
    paras = [" ".join(WORDS[(i * 7 + j * 3 + k) % len(WORDS)] for k in range(24))
             + f" (note {i}, part {j})." for j in range(20)]
    return f"# Note {i}\n\n" + "\n\n".join(paras)


def board(tmp_path: Path, models_dir: Path, name: str, dsn: str, *extra: str
          ) -> tuple[object, str]:
    state = tmp_path / name
    state.mkdir()
    (state / "models").symlink_to(models_dir, target_is_directory=True)
    proc, port = start_daemon(state, "--set", "index.backend=postgres", "--set",
                              f"index.dsn={dsn}", "--set", "index.claim_seconds=5", "--set",
                              "index.chunk_tokens=32", "--set", "index.embed_batch=16",
                              *extra, log=tmp_path / f"{name}.log")
    base = f"http://127.0.0.1:{port}"
    wait_http(base + "/health", timeout=60)
    return proc, base


def status(base: str) -> dict:
    return http_json(base + "/status", timeout=30)[1]


def pending_without_vectors(dsn: str) -> int:
    import psycopg

    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT count(*) FROM chunks WHERE NOT embedded OR embedding"
                            " IS NULL").fetchone()[0]


def test_two_daemons_share_the_corpus_and_the_embedding_backlog(tmp_path, models_dir,
                                                                pg_server):  # noqa: F811
    dsn = fresh_database(pg_server)
    proc_a, a = board(tmp_path, models_dir, "a", dsn)
    proc_b, b = board(tmp_path, models_dir, "b", dsn)
    procs = [proc_a, proc_b]
    try:
        assert http_json(a + "/collections", {"name": "notes"})[0] == 201
        for start in range(0, 110, 10):  # 110 notes x ~20 chunks: a backlog of > 2,000
            docs = [{"path": f"n{i}.md", "body": note(i)} for i in range(start, start + 10)]
            status_code, _ = http_json(a + "/collections/notes/documents", {"documents": docs},
                                       timeout=120)
            assert status_code in (200, 201)
        # Ingested through A, found through B (BM25 needs no vector).
        found = http_json(b + "/search?q=note%2042%20part%207&limit=5", timeout=30)[1]
        assert "notes/n42.md" in [r["displayPath"] for r in found["results"]]
        import psycopg

        with psycopg.connect(dsn) as conn:
            total = conn.execute("SELECT count(*) FROM chunks").fetchone()[0]
        assert total >= 2000, total
        # Both embed; once B has done a share, it is killed mid-batch.
        deadline = time.monotonic() + 600
        while status(b)["embedder"]["embedded"] < 100 and time.monotonic() < deadline:
            time.sleep(0.5)
        share_b = status(b)["embedder"]["embedded"]
        os.kill(proc_b.pid, signal.SIGKILL)
        proc_b.wait(10)
        share_a_then = status(a)["embedder"]["embedded"]
        assert share_b >= 100 and share_a_then > 0, (share_a_then, share_b)
        # A takes over: B's claimed batch lapses (5 s) and nothing is left unembedded.
        while time.monotonic() < deadline:
            st = status(a)
            if st["needsEmbedding"] == 0:
                break
            time.sleep(1)
        assert status(a)["needsEmbedding"] == 0
        assert pending_without_vectors(dsn) == 0
        share_a = status(a)["embedder"]["embedded"]
        print(f"\nbacklog of {total} chunks: daemon A embedded {share_a}, daemon B {share_b}"
              " before it was killed")
        assert share_a + share_b >= total  # B's lost batch (if any) was done again by A
        # Vector search through A finds what B embedded.
        hits = http_json(a + "/vsearch", {"query": "npu runtime driver kernel"}, timeout=60)[1]
        assert hits["results"]
        # A board with another embedding model refuses to embed into this index, says why,
        # and leaves what it ingests to the boards of the index's model.
        other = tiny_qwen3(rerank_gguf(models_dir), tmp_path / "other-embedder.gguf",
                           pooling=LAST_POOLING)
        proc_c, c = board(tmp_path, models_dir, "c", dsn, "--set",
                          f"models.embed.path={other}")
        procs.append(proc_c)
        assert http_json(c + "/collections/notes/documents/late.md",
                         {"body": note(999)}, method="PUT", timeout=60)[0] in (200, 201)
        while time.monotonic() < deadline and status(a)["needsEmbedding"]:
            time.sleep(0.5)
        assert status(a)["needsEmbedding"] == 0 and pending_without_vectors(dsn) == 0
        refusal = status(c)["embedder"]
        assert refusal["embedded"] == 0
        assert "does not embed into it" in refusal["last_error"], refusal
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(60)
