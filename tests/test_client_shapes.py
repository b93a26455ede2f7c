"""Every QMD remote-backend client's request shape (../shared/spec/qmd-remote-protocol.md,
"Client shapes"), sent exactly as that client sends it, and the answer checked the way that
client parses it - against the real embedded models."""

from __future__ import annotations

import asyncio
import json
import re

import pytest
from openai import AsyncOpenAI

from npuserve.daemon.http.services import SERVICES

QUERY = "how long do cats sleep"
DOCS = ["The stock market fell sharply in 2008.", "Cats sleep twelve to sixteen hours a day.",
        "Dogs enjoy playing fetch in the park."]
HEADERS = {"Content-Type": "application/json"}


def _sched(client):
    return client.app[SERVICES].scheduler


async def _qmd_scores(client) -> dict[int, float]:
    body = await (await client.post("/rerank", json={
        "query": QUERY, "documents": [{"file": f"{i}.md", "text": d}
                                      for i, d in enumerate(DOCS)]})).json()
    return {r["index"]: r["score"] for r in body["results"]}


# --- rerank: one implementation behind every shape ---------------------------------------


@pytest.mark.parametrize("path", ["/rerank", "/v1/rerank", "/v2/rerank"])
async def test_pr720_cohere_v2_rerank_on_each_path_it_tries(client, path):
    """#720's cohere_v2_rerank: {model, query, documents: [str]} on /rerank, /v1/rerank,
    /v2/rerank; it reads results[].index and results[].relevance_score."""
    resp = await client.post(path, json={"model": "rerank", "query": QUERY, "documents": DOCS},
                             headers=HEADERS)
    assert resp.status == 200
    results = (await resp.json())["results"]
    expected = await _qmd_scores(client)
    assert sorted(r["index"] for r in results) == [0, 1, 2]
    for r in results:
        assert isinstance(r["index"], int) and isinstance(r["relevance_score"], float)
        assert abs(r["relevance_score"] - expected[r["index"]]) < 1e-9
        assert r["score"] == r["relevance_score"]  # the Ollama+HTTP client reads `score`
    assert results[0]["index"] == 1  # the cat document first


async def test_ollama_style_api_rerank(client):
    """rkllama's and QMD's Ollama clients: POST /api/rerank {model, query, documents}."""
    resp = await client.post("/api/rerank", json={"model": "qwen3-reranker", "query": QUERY,
                                                  "documents": DOCS})
    assert resp.status == 200
    results = (await resp.json())["results"]
    assert [r["index"] for r in results][0] == 1
    assert all(set(r) >= {"index", "relevance_score", "score"} for r in results)


@pytest.mark.parametrize("path", ["/score", "/v1/score"])
async def test_pr720_vllm_score(client, path):
    """#720's vllm_score: {model, text_1: query, text_2: [docs]} -> data[{index, score}] in
    request order."""
    resp = await client.post(path, json={"model": "m", "text_1": QUERY, "text_2": DOCS})
    assert resp.status == 200
    body = await resp.json()
    expected = await _qmd_scores(client)
    assert body["object"] == "list" and [d["index"] for d in body["data"]] == [0, 1, 2]
    assert all(abs(d["score"] - expected[d["index"]]) < 1e-9 for d in body["data"])
    one = await (await client.post(path, json={"text_1": QUERY, "text_2": DOCS[1]})).json()
    assert len(one["data"]) == 1 and abs(one["data"][0]["score"] - expected[1]) < 1e-9


async def test_qmd_rerank_results_carry_both_score_names(client):
    body = await (await client.post("/rerank", json={
        "query": QUERY, "documents": [{"file": "a.md", "text": DOCS[1]}]})).json()
    (r,) = body["results"]
    assert r["file"] == "a.md" and r["score"] == r["relevance_score"]


@pytest.mark.parametrize("path,body,needle", [
    ("/score", {"text_1": QUERY}, "text_2"),
    ("/score", {"text_1": QUERY, "text_2": []}, "text_2"),
    ("/score", {"text_1": QUERY, "text_2": [1, 2]}, "text_2"),
    ("/v1/score", {"text_1": ["a"], "text_2": DOCS}, "text_1"),
    ("/api/rerank", {"query": QUERY}, "documents"),
    ("/v2/rerank", {"query": "", "documents": DOCS}, "query"),
])
async def test_bad_rerank_shapes_are_400_naming_the_field(client, path, body, needle):
    resp = await client.post(path, json=body)
    assert resp.status == 400
    assert needle in (await resp.json())["error"]


# --- generation: chat and completions ------------------------------------------------------

# #517's expansion request, as the client sends it (spec, "Client shapes").
EXPAND_SYSTEM = (
    "You are a search query expansion assistant. Given a search query, produce expanded"
    " variants in EXACTLY this format:\nlex: <keyword/BM25 variant>\nvec: <semantic"
    " paraphrase>\nhyde: <one-sentence hypothetical document excerpt>\n\nOutput only those"
    " three lines. No explanation, no extra text.")
LINE = re.compile(r"^(lex|vec|hyde): \S.*$")


def _expansion_chat(query: str) -> dict:
    return {"model": "qmd-expand", "messages": [
        {"role": "system", "content": EXPAND_SYSTEM},
        {"role": "user", "content": f"Expand this search query: {query}"}],
        "temperature": 0.7, "max_tokens": 200}


async def test_official_openai_client_chat_and_completions(live_server):
    oa = AsyncOpenAI(base_url=live_server + "/v1", api_key="unused", max_retries=0)
    chat = await oa.chat.completions.create(
        model="anything", messages=[{"role": "user", "content": "What is the capital of"
                                     " France?"}], max_tokens=24, temperature=0)
    text = chat.choices[0].message.content
    assert chat.choices[0].message.role == "assistant" and "Paris" in text
    assert chat.choices[0].finish_reason in ("stop", "length")
    assert chat.usage.completion_tokens > 0 and chat.model == "smollm2-135m-instruct"
    pieces, finish = [], None
    stream = await oa.chat.completions.create(
        model="anything", messages=[{"role": "user", "content": "What is the capital of"
                                     " France?"}], max_tokens=24, temperature=0, stream=True)
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
    assert len(pieces) > 1 and "".join(pieces) == text  # greedy: the same text, in pieces
    assert finish == chat.choices[0].finish_reason
    done = await oa.completions.create(model="m", prompt="The capital of France is",
                                       max_tokens=8, temperature=0, stop=["."])
    assert "Paris" in done.choices[0].text and "." not in done.choices[0].text
    assert done.choices[0].finish_reason == "stop"
    await oa.close()


async def test_ollama_generate_and_chat_stream_ndjson_by_default(client):
    resp = await client.post("/api/generate", json={
        "model": "m", "prompt": "What is the capital of France?",
        "options": {"num_predict": 24, "temperature": 0}})
    assert resp.status == 200 and resp.content_type == "application/x-ndjson"
    lines = [json.loads(line) for line in (await resp.text()).splitlines()]
    assert all(not x["done"] for x in lines[:-1]) and lines[-1]["done"]
    assert lines[-1]["eval_count"] > 0 and lines[-1]["done_reason"] in ("stop", "length")
    streamed = "".join(x["response"] for x in lines)
    whole = await (await client.post("/api/generate", json={
        "model": "m", "prompt": "What is the capital of France?", "stream": False,
        "options": {"num_predict": 24, "temperature": 0}})).json()
    assert whole["done"] and whole["response"] == streamed and "Paris" in streamed
    resp = await client.post("/api/chat", json={
        "model": "m", "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "options": {"num_predict": 24, "temperature": 0}})
    chat = [json.loads(line) for line in (await resp.text()).splitlines()]
    assert "".join(x["message"]["content"] for x in chat) == streamed
    assert chat[-1]["done"] and chat[0]["message"]["role"] == "assistant"


async def test_pr517_expansion_through_chat_is_what_expand_gives(make_client):
    """A chat completion carrying QMD's expansion prompt answers only lex/vec/hyde lines,
    the same lines /expand gives for the query (same seed, a fresh daemon each)."""
    query = "how do I compress files with gzip"
    expand = await make_client(models__expand__seed=11)
    lines = await (await expand.post("/expand", json={"query": query})).json()
    chat = await make_client(models__expand__seed=11)
    resp = await chat.post("/v1/chat/completions", json=_expansion_chat(query))
    assert resp.status == 200
    content = (await resp.json())["choices"][0]["message"]["content"]
    got = [line for line in content.splitlines() if line]
    assert got and all(LINE.match(line) for line in got)
    assert got == [f"{x['type']}: {x['text']}" for x in lines]


async def test_json_format_and_grammar_constrain_the_output(client):
    resp = await client.post("/api/generate", json={
        "model": "m", "prompt": "Name a colour as JSON.", "stream": False, "format": {
            "type": "object", "properties": {"colour": {"type": "string"}},
            "required": ["colour"]}, "options": {"num_predict": 48, "temperature": 0}})
    text = (await resp.json())["response"]
    if (await resp.json())["done_reason"] == "stop":
        assert isinstance(json.loads(text)["colour"], str)
    else:  # cut by num_predict: still the schema's shape so far
        assert text.lstrip().startswith('{') and '"colour"' in text
    resp = await client.post("/v1/completions", json={
        "prompt": "Answer yes or no: is the sky blue?", "grammar": 'root ::= "yes" | "no"',
        "max_tokens": 4})
    assert (await resp.json())["choices"][0]["text"] in ("yes", "no")


async def test_a_client_that_leaves_mid_stream_stops_the_generation(client):
    sched = _sched(client)
    resp = await client.post("/api/generate", json={
        "model": "m", "prompt": "Write a long story about a cat.",
        "options": {"num_predict": 1000, "temperature": 0.8}})
    assert resp.status == 200
    await resp.content.readline()  # the first piece has come
    resp.close()
    for _ in range(100):
        if sched.snapshot().events.get("cancelled_running"):
            break
        await asyncio.sleep(0.1)
    assert sched.snapshot().events["cancelled_running"] == 1


@pytest.mark.parametrize("path,body,status,needle", [
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400, "role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     400, "text parts"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 2}, 400, "n "),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "temperature": "hot"}, 400, "temperature"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "response_format": {"type": "xml"}}, 400, "response_format"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "grammar": "root ::= ("}, 400, "grammar"),
    ("/v1/completions", {"prompt": "x " * 3000, "max_tokens": 8}, 400, "context"),
    ("/api/generate", {"prompt": "x", "options": {"num_predict": -1}}, 400, "num_predict"),
    ("/api/generate", {"prompt": "x", "format": "yaml"}, 400, "format"),
    ("/api/generate", {"prompt": "x", "format": {"": [{"": None}]}}, 400, "JSON schema"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0, "max_completion_tokens": 4}, 400,
     "max_tokens"),
    ("/api/chat", {"messages": "hi"}, 400, "messages"),
])
async def test_bad_generation_requests_are_4xx_json(client, path, body, status, needle):
    resp = await client.post(path, json=body)
    assert resp.status == status
    assert needle in (await resp.json())["error"]


# --- small shape gaps ---------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/tokenize", "/v1/tokenize"])
async def test_vllm_tokenize_gives_ids_and_qmd_tokenize_a_count(client, path):
    qmd = await (await client.post(path, json={"text": "hello world"})).json()
    assert isinstance(qmd["tokens"], int) and qmd["tokens"] > 0
    resp = await client.post(path, json={"model": "m", "prompt": "hello world",
                                         "add_special_tokens": False})
    body = await resp.json()
    assert resp.status == 200 and body["count"] == len(body["tokens"]) == 2
    assert all(isinstance(t, int) for t in body["tokens"])
    with_special = await (await client.post(path, json={"prompt": "hello world"})).json()
    assert with_special["count"] == body["count"] + 2 == qmd["tokens"]  # [CLS] ... [SEP]
    assert with_special["tokens"][1:-1] == body["tokens"]
    assert with_special["max_model_len"] == 512


# --- embedding identity ---------------------------------------------------------------------


async def test_every_embedding_path_and_listing_carries_one_fingerprint(client):
    health = await (await client.get("/health")).json()
    fp = health["fingerprints"]["embed"]
    assert fp.startswith("sha256:") and len(fp) == len("sha256:") + 16
    seen = set()
    resp = await client.post("/embed", json={"text": "a"})
    seen |= {(await resp.json())["fingerprint"], resp.headers["X-Embedding-Fingerprint"]}
    batch = await client.post("/embed-batch", json={"texts": ["a", "", "b"]})
    seen |= {x["fingerprint"] for x in await batch.json() if x}
    seen.add((await (await client.post("/v1/embeddings", json={"input": "a"})).json())
             ["fingerprint"])
    seen.add((await (await client.post("/api/embed", json={"input": ["a"]})).json())
             ["fingerprint"])
    legacy = await client.post("/api/embeddings", json={"prompt": "a"})
    seen.add(legacy.headers["X-Embedding-Fingerprint"])
    models = (await (await client.get("/v1/models")).json())["data"]
    seen |= {m["fingerprint"] for m in models if "embed" in m["tasks"]}
    tags = (await (await client.get("/api/tags")).json())["models"]
    seen |= {m["details"]["fingerprint"] for m in tags if "fingerprint" in m["details"]}
    assert seen == {fp}


async def test_a_changed_model_file_under_the_same_name_does_not_mix_into_the_index(
        make_client, state_dir, models_dir, tmp_path):
    """Vectors are stored with the fingerprint of the file that made them; a daemon that
    embeds with another file (same name, same dimension) is refused on search (409) and its
    background embedding pauses with the reason, instead of mixing vectors silently."""
    original = models_dir / "all-minilm-l6-v2-f16.gguf"
    first = await make_client(models__embed__path=str(original))
    await first.post("/collections", json={"name": "c"})
    await first.put("/collections/c/documents/a.md", json={"body": "cats sleep a lot"})
    for _ in range(100):
        if not (await (await first.get("/status")).json())["needsEmbedding"]:
            break
        await asyncio.sleep(0.1)
    assert (await first.post("/vsearch", json={"query": "cats"})).status == 200
    await first.close()
    changed = tmp_path / "all-minilm-l6-v2-f16.gguf"
    changed.write_bytes(original.read_bytes() + b"\0" * 32)  # other bytes, same model name
    second = await make_client(models__embed__path=str(changed))
    resp = await second.post("/vsearch", json={"query": "cats"})
    body = await resp.json()
    assert resp.status == 409 and body["query_fingerprint"] != body["index_fingerprint"]
    assert (await second.post("/query", json={"query": "cats"})).status == 409
    await second.put("/collections/c/documents/b.md", json={"body": "dogs bark"})
    for _ in range(100):
        status = await (await second.get("/status")).json()
        if "vectors of" in str(status):
            break
        await asyncio.sleep(0.1)
    assert "re-embed the index" in str(status)


async def test_a_request_naming_another_model_is_served_counted_or_refused(make_client):
    lax = await make_client()
    resp = await lax.post("/embed", json={"text": "a", "options": {"model": "embeddinggemma"}})
    assert resp.status == 200 and (await resp.json())["model"] == "all-minilm-l6-v2"
    metrics = await (await lax.get("/metrics")).text()
    assert 'npuserve_model_mismatch_total{task="embed"} 1' in metrics
    strict = await make_client(server__strict_models="true",
                               models__embed__aliases='["text-embedding-3-small"]')
    resp = await strict.post("/v1/embeddings", json={"input": "a", "model": "embeddinggemma"})
    assert resp.status == 409 and "all-minilm-l6-v2" in (await resp.json())["error"]
    ok = await strict.post("/v1/embeddings", json={"input": "a",
                                                   "model": "text-embedding-3-small"})
    assert ok.status == 200
    resp = await strict.post("/v2/rerank", json={"model": "bge", "query": "q",
                                                 "documents": ["d"]})
    assert resp.status == 409 and "smollm2" in (await resp.json())["error"]


async def test_pr720_cohere_v2_embed_and_vllm_pooling(client):
    """#720's other embedding formats: Cohere /v2/embed and vLLM /pooling, the same vectors
    as /embed for the same texts."""
    texts = ["task: search result | query: cats", "title: Cats | text: Cats sleep a lot."]
    ref = [(await (await client.post("/embed", json={"text": t})).json())["embedding"]
           for t in texts]
    resp = await client.post("/v2/embed", json={"model": "embed-v4.0", "texts": texts,
                                                "input_type": "search_query",
                                                "embedding_types": ["float"]})
    assert resp.status == 200
    cohere = await resp.json()
    assert cohere["response_type"] == "embeddings_by_type"
    resp = await client.post("/pooling", json={"model": "m", "input": texts})
    pooled = await resp.json()
    assert [d["index"] for d in pooled["data"]] == [0, 1]
    for i in range(2):
        assert abs(sum(a * b for a, b in zip(cohere["embeddings"]["float"][i], ref[i],
                                             strict=True)) - 1) < 1e-5
        assert abs(sum(a * b for a, b in zip(pooled["data"][i]["data"], ref[i],
                                             strict=True)) - 1) < 1e-5
    bad = await client.post("/v2/embed", json={"texts": texts, "embedding_types": ["int8"]})
    assert bad.status == 400 and "embedding_types" in (await bad.json())["error"]
