"""The document index over a real corpus: Debian's manual pages for core tools."""

from __future__ import annotations

import asyncio
import gzip
import re
from pathlib import Path

import pytest

from npuserve.daemon.http.services import SERVICES
from tests.pg_support import both_index_backends, pg_server  # noqa: F401 - both backends

MAN = Path("/usr/share/man/man1")
PAGES = ["ls", "cp", "mv", "chmod", "chown", "mkdir", "rm", "cat", "sort", "gzip", "tar",
         "grep", "sed", "find", "ln", "touch"]


def man_text(name: str) -> str | None:
    """A man page as plain-ish text (troff requests and font escapes removed)."""
    path = MAN / f"{name}.1.gz"
    if not path.is_file():
        return None
    raw = gzip.decompress(path.read_bytes()).decode("utf-8", "replace")
    lines = []
    for line in raw.splitlines():
        if line.startswith((".\\\"", "'\\\"")):
            continue
        line = re.sub(r"^\.(SH|SS)\s+", "## ", line)
        if line.startswith("."):
            line = re.sub(r"^\.[A-Za-z]+\s*", "", line)
        line = re.sub(r"\\f[BIRP]|\\\(..|\\[-&e]", lambda m: "-" if m.group() == "\\-" else "",
                      line)
        lines.append(line)
    return "\n".join(lines)


@pytest.fixture(scope="module")
def corpus() -> dict[str, str]:
    texts = {n: t for n in PAGES if (t := man_text(n))}
    if len(texts) < 12:
        pytest.skip(f"only {len(texts)} of the core manual pages are installed here")
    return texts


async def _ingest(client, corpus: dict[str, str]) -> None:
    assert (await client.post("/collections", json={"name": "man"})).status == 201
    docs = [{"path": f"man1/{n}.1", "body": t, "title": n} for n, t in corpus.items()]
    resp = await client.post("/collections/man/documents", json={"documents": docs})
    assert resp.status == 200, await resp.text()


async def _wait_embedded(client, timeout: float = 300) -> dict:
    for _ in range(int(timeout / 0.25)):
        status = await (await client.get("/status")).json()
        if status["needsEmbedding"] == 0:
            return status
        await asyncio.sleep(0.25)
    raise AssertionError(f"still {status['needsEmbedding']} documents to embed")


def _paths(body: dict) -> list[str]:
    return [r["displayPath"] for r in body["results"]]


@pytest.fixture
async def indexed(make_client, corpus):
    # Smaller chunks than the default keep the SmolLM2 rerank stage quick in tests; a
    # fixed expansion seed makes hybrid results the same on every run (sampling at
    # temperature 0.7 with a random seed once let a weak expansion push mv out of the top 3).
    client = await make_client(index__chunk_tokens="160", models__expand__seed="42")
    await _ingest(client, corpus)
    return client


async def test_bm25_finds_known_answers(indexed):
    for query, page in [("change file mode bits", "chmod"), ("copy files and directories", "cp"),
                        ("list directory contents", "ls"), ("compress or expand files", "gzip"),
                        ("an archiving utility", "tar")]:
        body = await (await indexed.get("/search", params={"q": query, "limit": "3"})).json()
        assert _paths(body)[0] == f"man/man1/{page}.1", (query, _paths(body))
        assert body["results"][0]["source"] == "fts"
        assert 0 < body["results"][0]["score"] < 1


async def test_bm25_works_before_any_vector_exists(make_client, corpus, tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 32)
    client = await make_client(models__embed__path=str(broken), index__chunk_tokens="400")
    await _ingest(client, {"chmod": corpus["chmod"]})
    body = await (await client.get("/search", params={"q": "file mode bits"})).json()
    assert _paths(body) == ["man/man1/chmod.1"]
    await asyncio.sleep(0.5)
    status = await (await client.get("/status")).json()
    assert status["totalDocuments"] == 1 and status["needsEmbedding"] == 1
    assert "cannot load" in status["embedder"]["last_error"]


@pytest.mark.slow  # slow: the whole hybrid pipeline (expansion, embedding, rerank) on real models
async def test_vector_and_hybrid_search_find_paraphrases(indexed):
    status = await _wait_embedded(indexed)
    assert status["hasVectorIndex"] is True and status["totalDocuments"] >= 12
    paraphrases = [("make a script executable by changing its permissions", "chmod"),
                   ("search text for lines matching a pattern", "grep"),
                   ("rename or move a file", "mv"),
                   ("put lines of text in order", "sort")]
    for query, page in paraphrases:
        vec = await (await indexed.post("/vsearch", json={"query": query, "limit": 3})).json()
        assert f"man/man1/{page}.1" in _paths(vec), (query, _paths(vec))
        assert vec["results"][0]["source"] == "vec"
    # Hybrid fuses BM25, vectors and the (weak, 135M) default reranker: questions that
    # share words with their answer, as agents usually ask them.
    questions = [("how do I change the permissions of a file", "chmod"),
                 ("copy a directory and the files in it", "cp"),
                 ("rename or move a file", "mv")]
    for query, page in questions:
        hyb = await indexed.post("/query", json={"query": query, "limit": 3})
        assert hyb.status == 200
        body = await hyb.json()
        assert f"man/man1/{page}.1" in _paths(body), (query, _paths(body))
        names = [s["name"] for s in body["stages"] if s["ran"]]
        assert {"bm25", "embed", "search", "rerank"} <= set(names)


@pytest.mark.slow  # slow: the whole hybrid pipeline (expansion, embedding, rerank) on real models
async def test_hybrid_skips_expansion_on_strong_bm25_signal(indexed):
    await _wait_embedded(indexed)
    # Words only gzip's page uses: one clear BM25 winner, so no expansion is needed.
    body = await (await indexed.post("/query", json={
        "query": "uncompressed decompressing ratio"})).json()
    expand = [s for s in body["stages"] if s["name"] == "expand"][0]
    assert expand["ran"] is False and "strong" in expand["detail"]
    assert _paths(body)[0] == "man/man1/gzip.1"
    # With an intent, QMD always expands.
    body = await (await indexed.post("/query", json={
        "query": "uncompressed decompressing ratio", "intent": "file compression"})).json()
    assert [s for s in body["stages"] if s["name"] == "expand"][0]["ran"] is True


async def test_unchanged_documents_are_not_reembedded(indexed, corpus, index_overrides):
    storage = (await _wait_embedded(indexed))["storage"]
    if index_overrides:  # PostgreSQL: the HNSW index's size against shared_buffers
        assert storage["backend"] == "postgres" and storage["vectorIndexBytes"] > 0
        assert storage["sharedBuffersBytes"] >= storage["vectorIndexBytes"]
        assert storage["warning"] is None
    else:
        assert storage == {"backend": "sqlite", "warning": None}
    sched = indexed.app[SERVICES].scheduler
    calls = sched.snapshot().events.get("backend_calls", 0)
    resp = await indexed.put("/collections/man/documents/man1/ls.1",
                             json={"body": corpus["ls"], "title": "ls"})
    assert resp.status == 200 and (await resp.json())["status"] == "unchanged"
    await asyncio.sleep(0.3)
    assert sched.snapshot().events.get("backend_calls", 0) == calls
    changed = await indexed.put("/collections/man/documents/man1/ls.1",
                                json={"body": corpus["ls"] + "\nNew line.", "title": "ls"})
    assert (await changed.json())["status"] == "replaced"
    status = await _wait_embedded(indexed)
    assert status["needsEmbedding"] == 0


async def test_document_crud_and_browse(client):
    assert (await client.post("/collections", json={"name": "notes"})).status == 201
    assert (await client.post("/collections", json={"name": "notes"})).status == 200
    put = await client.put("/collections/notes/documents/a/b.md",
                           json={"body": "# Heading here\n\nSome body text.",
                                 "metadata": {"tag": "x"}})
    assert put.status == 201
    doc = await (await client.get("/collections/notes/documents/a/b.md")).json()
    assert doc["title"] == "Heading here" and doc["metadata"] == {"tag": "x"}
    browse = await (await client.get("/browse", params={"collection": "notes"})).json()
    assert browse["total"] == 1 and browse["chunks"][0]["path"] == "a/b.md"
    cols = await (await client.get("/collections")).json()
    assert cols[0]["name"] == "notes" and cols[0]["doc_count"] == 1
    assert (await client.delete("/collections/notes/documents/a/b.md")).status == 200
    assert (await client.get("/collections/notes/documents/a/b.md")).status == 404
    assert (await client.delete("/collections/notes")).status == 200
    assert (await client.get("/collections")).status == 200


@pytest.mark.parametrize("path", ["../etc/passwd", "a/../../b", "/abs/path", "a/./b", "a//b"])
async def test_path_traversal_is_refused(client, path):
    await client.post("/collections", json={"name": "c"})
    resp = await client.post("/collections/c/documents",
                             json={"documents": [{"path": path, "body": "x"}]})
    assert resp.status == 400 and "path" in (await resp.json())["error"]


@pytest.mark.parametrize("method,url,body,status,needle", [
    ("post", "/collections", {"name": "../x"}, 400, "collection name"),
    ("post", "/collections", {"name": ""}, 400, "name"),
    ("put", "/collections/nope/documents/a.md", {"body": "x"}, 404, "no collection"),
    ("put", "/collections/bad%20name/documents/a.md", {"body": "x"}, 400, "collection name"),
    ("put", "/collections/c/documents/a.md", {"body": ""}, 400, "body"),
    ("put", "/collections/c/documents/a.md", {"body": "x", "metadata": []}, 400, "metadata"),
    ("post", "/collections/c/documents", {"documents": []}, 400, "documents"),
    ("get", "/search?q=", None, 400, "q must be"),
    ("get", "/search?q=x&limit=0", None, 400, "limit"),
    ("get", "/search?q=x&limit=abc", None, 400, "limit"),
    ("get", "/browse?offset=-1", None, 400, "offset"),
    ("post", "/vsearch", {"query": ""}, 400, "query"),
    ("post", "/vsearch", {"query": "x", "limit": 100000}, 400, "limit"),
    ("post", "/query", {"query": "x", "collection": "../y"}, 400, "collection name"),
])
async def test_index_bad_input(client, method, url, body, status, needle):
    await client.post("/collections", json={"name": "c"})
    resp = await getattr(client, method)(url, json=body) if body is not None else \
        await getattr(client, method)(url)
    assert resp.status == status, await resp.text()
    assert needle in (await resp.json())["error"]


async def test_failed_batch_leaves_index_as_it_was(client):
    await client.post("/collections", json={"name": "c"})
    ok = {"path": "good.md", "body": "fine"}
    resp = await client.post("/collections/c/documents",
                             json={"documents": [ok, {"path": "../bad", "body": "x"}]})
    assert resp.status == 400
    dup = await client.post("/collections/c/documents", json={"documents": [ok, ok]})
    assert dup.status == 400
    status = await (await client.get("/status")).json()
    assert status["totalDocuments"] == 0


async def test_non_utf8_document_body_is_400(client):
    await client.post("/collections", json={"name": "c"})
    resp = await client.put("/collections/c/documents/a.md", data=b'{"body": "\xff"}',
                            headers={"Content-Type": "application/json"})
    assert resp.status == 400 and "UTF-8" in (await resp.json())["error"]


async def test_vsearch_409_on_model_mismatch(make_client, corpus):
    first = await make_client()
    await _ingest(first, {"ls": corpus["ls"]})
    await _wait_embedded(first)
    await first.close()
    other = await make_client(models__embed__name="renamed-embedder")
    resp = await other.post("/vsearch", json={"query": "list files"})
    assert resp.status == 409
    body = await resp.json()
    assert body["query_model"] == "renamed-embedder" and body["query_dim"] == 384
    assert "all-minilm-l6-v2" in body["detail"] and body["hint"]


async def test_index_disabled_answers_503(make_client):
    client = await make_client(index__enabled="false")
    resp = await client.get("/search", params={"q": "x"})
    assert resp.status == 503 and (await resp.json())["error"] == "No index database loaded"


async def test_a_document_larger_than_the_full_text_limit_is_stored_and_found(client):
    """1.8 MB of distinct words: over PostgreSQL's 1 MB tsvector limit if it were indexed
    whole (its full-text column reads the first 400,000 characters); stored whole, found."""
    import random
    import string

    rnd = random.Random(7)
    words = ["".join(rnd.choices(string.ascii_lowercase, k=rnd.randint(4, 12)))
             for _ in range(200_000)]
    body = "# Huge\n\nzyzzyva " + " ".join(words)
    assert len(body) > 1_700_000
    assert (await client.post("/collections", json={"name": "big"})).status == 201
    resp = await client.put("/collections/big/documents/huge.md", json={"body": body})
    assert resp.status in (200, 201), await resp.text()
    found = await (await client.get("/search", params={"q": "zyzzyva"})).json()
    assert _paths(found) == ["big/huge.md"]
    doc = await (await client.get("/collections/big/documents/huge.md")).json()
    assert len(doc["body"]) == len(body)


def test_an_index_larger_than_shared_buffers_is_named_with_the_fix():
    from npuserve.daemon.index.pg_storage import buffers_warning

    assert buffers_warning(100 * 2**20, 128 * 2**20) is None
    warning = buffers_warning(1953 * 2**20, 128 * 2**20)
    assert "1953 MB" in warning and "128 MB" in warning and "at least 2441 MB" in warning

