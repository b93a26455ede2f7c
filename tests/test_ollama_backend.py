"""A task delegated to an Ollama-compatible server (as rkllama serves RKLLM models on the
NPU), against a small server of the test's own that answers with real models."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from npuserve.daemon.models.store import SMOLLM2_RERANK_TEMPLATE
from npuserve.daemon.worker.protocol import ModelSpec
from npuserve.fallback.llama_embed import LlamaEmbedBackend
from npuserve.fallback.llama_generative import LlamaGenerativeBackend


@pytest.fixture
async def rkllama_like(models_dir):
    """/api/tags, /api/embed, /api/rerank, /api/generate over the default models; the
    first /api/generate answers 503 so the client's retry is exercised."""
    gen_path = str(next(models_dir.glob("SmolLM2*.gguf")))
    emb_path = str(next(models_dir.glob("all-minilm*.gguf")))
    gen = LlamaGenerativeBackend(ModelSpec("g", "k", gen_path, 2048, 0,
                                           (("template", SMOLLM2_RERANK_TEMPLATE),)))
    emb = LlamaEmbedBackend(ModelSpec("e", "k", emb_path, 512, 0, ()))
    await asyncio.to_thread(gen.load)
    await asyncio.to_thread(emb.load)
    calls = {"generate": 0}

    async def tags(request):
        return web.json_response({"models": [{"name": "qwen-rkllm"}]})

    async def embed(request):
        body = await request.json()
        texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
        out = await asyncio.to_thread(emb.embed, texts)
        return web.json_response({"embeddings": out.vectors.tolist(),
                                  "prompt_eval_count": out.tokens})

    async def rerank(request):
        body = await request.json()
        out = await asyncio.to_thread(gen.rerank, body["query"], body["documents"], "")
        return web.json_response({"results": [{"index": i, "relevance_score": s}
                                              for i, s in enumerate(out.scores)]})

    async def generate(request):
        calls["generate"] += 1
        if calls["generate"] == 1:
            return web.json_response({"error": "busy"}, status=503)
        body = await request.json()
        assert body["stream"] is False and body["options"]["top_k"] == 20

        query = body["prompt"].split(": ", 1)[1]
        # The model's own text, as rkllama would return it (our backend loads models with
        # the AMX-safe settings; llama_cpp.Llama would not), after a line the test checks.
        out = await asyncio.to_thread(gen.expand, query, None, True)
        return web.json_response({"response": f"lex: {query}\n{out.raw}",
                                  "eval_count": out.tokens})

    app = web.Application()
    app.add_routes([web.get("/api/tags", tags), web.post("/api/embed", embed),
                    web.post("/api/rerank", rerank), web.post("/api/generate", generate)])
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield f"http://127.0.0.1:{server.port}", calls
    await server.close()
    gen.unload()
    emb.unload()


async def test_expansion_and_rerank_through_an_ollama_compatible_server(make_client,
                                                                       rkllama_like):
    url, calls = rkllama_like
    client = await make_client(**{f"models__{t}__{k}": v for t in ("expand", "rerank")
                                  for k, v in (("backend", "ollama"), ("ollama_url", url),
                                               ("ollama_model", "qwen-rkllm"))})
    health = await (await client.get("/health")).json()
    assert health["ok"] is True and health["devices"]["generate"]["device"] == "remote"
    resp = await client.post("/expand", json={"query": "debian kernel modules"})
    assert resp.status == 200
    lines = await resp.json()
    assert {"type": "lex", "text": "debian kernel modules"} in lines
    assert calls["generate"] == 2, "the first 503 was retried"
    rr = await client.post("/rerank", json={"query": "how long do cats sleep", "documents": [
        {"file": "f.md", "text": "The stock market fell sharply in 2008."},
        {"file": "c.md", "text": "Cats sleep twelve to sixteen hours a day."}]})
    assert rr.status == 200
    assert (await rr.json())["results"][0]["file"] == "c.md"


async def test_unreachable_ollama_server_is_a_clear_503(make_client):
    client = await make_client(models__expand__backend="ollama",
                               models__expand__ollama_url="http://127.0.0.1:9",
                               models__expand__ollama_model="m",
                               models__expand__ollama_timeout="2")
    resp = await client.post("/expand", json={"query": "x"})
    assert resp.status == 503
    assert "127.0.0.1:9" in (await resp.json())["error"]
