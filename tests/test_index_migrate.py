"""`npuserve index migrate --to postgres`: an SQLite index of the standard library's
documentation copied into PostgreSQL + pgvector without re-embedding; searches through a
daemon on each give the same answers."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from .pg_support import fresh_database, pg_server  # noqa: F401 - the fixture

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from stdlib_corpus import QUESTIONS, documents  # noqa: E402


async def _ingest(client) -> None:
    assert (await client.post("/collections", json={"name": "stdlib"})).status == 201
    docs = documents(cap=4000)
    for first in range(0, len(docs), 32):
        resp = await client.post("/collections/stdlib/documents",
                                 json={"documents": docs[first:first + 32]})
        assert resp.status in (200, 201)
    for _ in range(1200):
        if (await (await client.get("/status")).json())["needsEmbedding"] == 0:
            return
        await asyncio.sleep(0.25)
    raise AssertionError("the stdlib corpus was not embedded")


def _top(body: dict, n: int) -> list[str]:
    return [r["displayPath"] for r in body["results"][:n]]


@pytest.mark.slow  # the corpus is embedded first (~1 min)
async def test_migrated_index_answers_as_the_sqlite_one(make_client, state_dir, pg_server):  # noqa: F811
    settings = {"models__expand__seed": "42", "index__rerank_seconds": "2"}
    lite = await make_client(**settings)
    await _ingest(lite)
    dsn = fresh_database(pg_server)
    done = subprocess.run([sys.executable, "-m", "npuserve.daemon.cli", "index", "migrate",
                           "--to", "postgres", "--dsn", dsn, "--state-dir", str(state_dir)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "documents: 131" in done.stdout
    pg = await make_client(**settings, index__backend="postgres", index__dsn=dsn)
    status = await (await pg.get("/status")).json()
    assert status["totalDocuments"] == 131 and status["needsEmbedding"] == 0
    assert status["hasVectorIndex"] is True
    # Nothing was embedded again: the daemon on PostgreSQL found every vector there.
    await asyncio.sleep(1)
    assert (await (await pg.get("/status")).json())["embedder"]["embedded"] == 0
    for question, _ in QUESTIONS:
        a = await (await lite.post("/vsearch", json={"query": question, "limit": 5})).json()
        b = await (await pg.post("/vsearch", json={"query": question, "limit": 5})).json()
        assert _top(a, 5) == _top(b, 5), question
    same = 0
    for question, _ in QUESTIONS[:4]:
        a = await (await lite.post("/query", json={"query": question, "limit": 3})).json()
        b = await (await pg.post("/query", json={"query": question, "limit": 3})).json()
        same += _top(a, 1) == _top(b, 1)
        print(f"\n{question!r}: sqlite {_top(a, 3)} / postgres {_top(b, 3)}")
    assert same == 4
    # Ingesting again into the migrated index: the ids' sequences moved past the copies.
    resp = await pg.put("/collections/stdlib/documents/new.txt", json={"body": "fresh text"})
    assert resp.status in (200, 201)


def _migrate(state_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "npuserve.daemon.cli", "index", "migrate",
                           "--to", "postgres", "--state-dir", str(state_dir), *args],
                          capture_output=True, text=True, timeout=120)


async def test_migrate_refuses_without_a_target_or_into_a_used_database(make_client, state_dir,
                                                                        pg_server):  # noqa: F811
    no_dsn = _migrate(state_dir)
    assert no_dsn.returncode == 2 and "give --dsn or set index.dsn" in no_dsn.stderr
    no_index = _migrate(state_dir, "--dsn", fresh_database(pg_server), "--from",
                        str(state_dir / "nothing.sqlite"))
    assert no_index.returncode == 1 and "no SQLite index" in no_index.stderr
    lite = await make_client()
    assert (await lite.post("/collections", json={"name": "n"})).status == 201
    assert (await lite.put("/collections/n/documents/a.md", json={"body": "words"})).status \
        in (200, 201)
    dsn = fresh_database(pg_server)
    assert _migrate(state_dir, "--dsn", dsn).returncode == 0
    again = _migrate(state_dir, "--dsn", dsn)  # the target holds documents now
    assert again.returncode == 1 and "already holds 1 documents" in again.stderr
