"""What OpenAI, Cohere/Jina, TEI and Ollama clients expect, checked with real models."""

from __future__ import annotations

import base64

import numpy as np
import pytest
from openai import AsyncOpenAI

DOCS = ["The stock market fell sharply in 2008.", "Cats sleep twelve to sixteen hours a day.",
        "Dogs enjoy playing fetch in the park."]


async def test_official_openai_client(live_server):
    """The official client asks for base64 by default and must get the same vectors."""
    oa = AsyncOpenAI(base_url=live_server + "/v1", api_key="unused", max_retries=0)
    single = await oa.embeddings.create(model="text-embedding-3-small", input="hello world")
    assert len(single.data) == 1 and len(single.data[0].embedding) == 384
    batch = await oa.embeddings.create(model="whatever", input=["hello world", "cats"])
    assert [d.index for d in batch.data] == [0, 1]
    assert np.allclose(batch.data[0].embedding, single.data[0].embedding, atol=1e-5)
    assert batch.model == "all-minilm-l6-v2"
    assert batch.usage.prompt_tokens > 0
    floats = await oa.embeddings.create(model="m", input="hello world", encoding_format="float")
    assert np.allclose(floats.data[0].embedding, single.data[0].embedding, atol=1e-6)
    models = await oa.models.list()
    assert {m.id for m in models.data} == {"all-minilm-l6-v2", "smollm2-135m-instruct"}
    await oa.close()


async def test_openai_base64_is_little_endian_float32(client):
    b64 = await (await client.post("/v1/embeddings", json={
        "input": "x", "encoding_format": "base64"})).json()
    flt = await (await client.post("/v1/embeddings", json={"input": "x"})).json()
    decoded = np.frombuffer(base64.b64decode(b64["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(decoded, flt["data"][0]["embedding"], atol=1e-7)
    assert b64["object"] == "list" and b64["data"][0]["object"] == "embedding"


@pytest.mark.parametrize("docs", [DOCS, [{"text": d} for d in DOCS]])
async def test_cohere_rerank(client, docs):
    resp = await client.post("/v1/rerank", json={
        "model": "rerank-v3", "query": "how long do cats sleep", "documents": docs,
        "top_n": 2, "return_documents": True})
    assert resp.status == 200
    body = await resp.json()
    results = body["results"]
    assert len(results) == 2
    assert results[0]["relevance_score"] >= results[1]["relevance_score"]
    for r in results:
        assert r["document"]["text"] == DOCS[r["index"]]
    assert body["usage"]["total_tokens"] > 0


async def test_cohere_shape_on_qmd_rerank_path(client):
    """llama-server accepts both forms on /rerank; so do we."""
    body = await (await client.post("/rerank", json={
        "query": "how long do cats sleep", "documents": DOCS})).json()
    assert {r["index"] for r in body["results"]} == {0, 1, 2}
    assert all("relevance_score" in r and "file" not in r for r in body["results"])


async def test_tei_rerank_shape(client):
    body = await (await client.post("/rerank", json={"query": "cats", "texts": DOCS})).json()
    assert isinstance(body, list) and {r["index"] for r in body} == {0, 1, 2}
    assert [r["score"] for r in body] == sorted((r["score"] for r in body), reverse=True)


async def test_same_scores_in_every_shape(client):
    qmd = await (await client.post("/rerank", json={
        "query": "cats", "documents": [{"file": f"{i}.md", "text": d}
                                       for i, d in enumerate(DOCS)]})).json()
    cohere = await (await client.post("/v1/rerank", json={"query": "cats",
                                                          "documents": DOCS})).json()
    by_index = {r["index"]: r["score"] for r in qmd["results"]}
    for r in cohere["results"]:
        assert abs(by_index[r["index"]] - r["relevance_score"]) < 1e-9


async def test_ollama_embed_tags_version(client):
    resp = await client.post("/api/embed", json={"model": "all-minilm", "input": ["a", "b"]})
    body = await resp.json()
    assert resp.status == 200
    assert len(body["embeddings"]) == 2 and len(body["embeddings"][0]) == 384
    assert body["prompt_eval_count"] > 0 and body["total_duration"] > 0
    single = await (await client.post("/api/embed", json={"model": "m", "input": "a"})).json()
    assert np.allclose(single["embeddings"][0], body["embeddings"][0], atol=1e-6)
    legacy = await (await client.post("/api/embeddings", json={"model": "m",
                                                               "prompt": "a"})).json()
    assert np.allclose(legacy["embedding"], body["embeddings"][0], atol=1e-6)
    tags = await (await client.get("/api/tags")).json()
    assert {m["name"] for m in tags["models"]} == {"all-minilm-l6-v2", "smollm2-135m-instruct"}
    assert all(m["size"] > 0 for m in tags["models"])
    ps = await (await client.get("/api/ps")).json()
    assert [m["name"] for m in ps["models"]] == ["all-minilm-l6-v2"]
    assert (await (await client.get("/api/version")).json())["version"]


async def test_metrics_prometheus_text(client):
    await client.post("/embed", json={"text": "count me"})
    await client.get("/nowhere")
    text = await (await client.get("/metrics")).text()
    assert 'npuserve_http_requests_total{endpoint="/embed",status="200"} 1' in text
    assert 'status="404"' in text
    assert "npuserve_http_request_duration_seconds_bucket" in text
    assert 'npuserve_model_loads_total{model="all-minilm-l6-v2",device="cpu"} 1' in text
    assert "npuserve_queue_depth" in text
    assert 'npuserve_model_load_seconds_total{model="all-minilm-l6-v2"' in text
    # Counts that only grow are typed counter (rate() works on them); levels are gauges.
    assert "# TYPE npuserve_model_loads_total counter" in text
    assert "# TYPE npuserve_scheduler_loads_total counter" in text
    assert "# TYPE npuserve_queue_depth gauge" in text
    assert "# TYPE npuserve_model_loads " not in text, "no untyped twin of a counter"
