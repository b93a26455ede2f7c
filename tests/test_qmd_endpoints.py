"""QMD's remote protocol against the real default models."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

REFERENCE = json.loads((Path(__file__).parent / "fixtures/minilm_reference.json").read_text())


async def test_health_names_the_three_models(client):
    resp = await client.get("/health")
    assert resp.status == 200
    body = await resp.json()
    assert body["ok"] is True
    assert body["version"] == "2"
    assert body["models"] == {
        "embed": "all-minilm-l6-v2",
        "rerank": "smollm2-135m-instruct",
        "generate": "smollm2-135m-instruct",
    }


async def test_embed_matches_sentence_transformers(client):
    """The GGUF converted without torch reproduces sentence-transformers' vectors."""
    for text, ref in zip(REFERENCE["texts"], REFERENCE["vectors"], strict=True):
        resp = await client.post("/embed", json={"text": text})
        assert resp.status == 200
        body = await resp.json()
        assert body["model"] == "all-minilm-l6-v2"
        vec = np.array(body["embedding"])
        assert vec.shape == (384,)
        assert abs(np.linalg.norm(vec) - 1.0) < 1e-4
        assert float(vec @ np.array(ref)) > 0.999


async def test_embed_text_is_not_prefixed(client):
    """QMD formats the text itself: the server embeds it exactly as received."""
    a = await (await client.post("/embed", json={"text": "query: cats",
                                                 "options": {"isQuery": True}})).json()
    b = await (await client.post("/embed", json={"text": "query: cats"})).json()
    assert a["embedding"] == b["embedding"]


async def test_embed_batch_keeps_order_and_nulls_empty(client):
    texts = ["first text about boats", "", "second text about planes"]
    resp = await client.post("/embed-batch", json={"texts": texts, "options": {"model": "x"}})
    assert resp.status == 200
    body = await resp.json()
    assert len(body) == 3 and body[1] is None
    for i in (0, 2):
        single = await (await client.post("/embed", json={"text": texts[i]})).json()
        assert np.allclose(body[i]["embedding"], single["embedding"], atol=1e-5)


async def test_embed_truncates_long_text_and_says_so(client):
    long_text = "word " * 2000
    resp = await client.post("/embed", json={"text": long_text})
    assert resp.status == 200
    body = await resp.json()
    assert body["truncated"] is True
    short = await (await client.post("/embed", json={"text": "word"})).json()
    assert short["truncated"] is False


async def test_rerank_echoes_file_and_index_sorted(client):
    docs = [
        {"file": "finance.md", "text": "The stock market fell sharply in 2008."},
        {"file": "cats.md", "text": "Cats sleep twelve to sixteen hours a day.", "title": "Cats"},
        {"file": "dogs.md", "text": "Dogs enjoy playing fetch in the park."},
    ]
    resp = await client.post("/rerank", json={"query": "how long do cats sleep",
                                              "documents": docs})
    assert resp.status == 200
    body = await resp.json()
    assert body["model"] == "smollm2-135m-instruct"
    results = body["results"]
    assert sorted(r["file"] for r in results) == ["cats.md", "dogs.md", "finance.md"]
    for r in results:
        assert docs[r["index"]]["file"] == r["file"]
        assert 0.0 < r["score"] < 1.0
    scores = [r["score"] for r in results]
    assert scores == sorted(scores, reverse=True)
    assert results[0]["file"] == "cats.md"


async def test_expand_returns_typed_lines(client):
    resp = await client.post("/expand", json={"query": "debian kernel modules",
                                              "options": {"intent": "load a driver"}})
    assert resp.status == 200
    lines = await resp.json()
    assert lines, "expansion never returns nothing (fallback list at least)"
    terms = {"debian", "kernel", "modules"}
    for line in lines:
        assert line["type"] in ("lex", "vec", "hyde")
        # QMD's filter: every kept line shares a term with the query (the
        # fallback lines contain the query itself).
        words = set(re.findall(r"[\w']+", line["text"].lower()))
        assert terms & words, line


async def test_expand_without_lexical(client):
    resp = await client.post("/expand", json={"query": "zzqx unknownterm",
                                              "options": {"includeLexical": False}})
    assert resp.status == 200
    assert all(line["type"] != "lex" for line in await resp.json())


async def test_tokenize_counts_tokens(client):
    one = await (await client.post("/tokenize", json={"text": "hello"})).json()
    many = await (await client.post("/tokenize", json={"text": "hello " * 50})).json()
    assert isinstance(one["tokens"], int) and one["tokens"] >= 1
    assert many["tokens"] > one["tokens"] + 40


async def test_timing_headers(client):
    resp = await client.post("/embed", json={"text": "timing"})
    for h in ("x-queue-time", "x-load-time", "x-inference-time"):
        assert float(resp.headers[h]) >= 0.0


async def test_flash_attention_off_gives_the_same_vectors(make_client, client):
    # flash_attn=false also turns packing off (one text per decode): results must not move.
    texts = ["a short query", "another one about kernel modules", "x " * 200]
    plain = await make_client(models__embed__flash_attn="false")
    default = await (await client.post("/embed-batch", json={"texts": texts})).json()
    off = await (await plain.post("/embed-batch", json={"texts": texts})).json()
    for a, b in zip(default, off, strict=True):
        va, vb = np.asarray(a["embedding"]), np.asarray(b["embedding"])
        assert float(va @ vb) > 0.99999
