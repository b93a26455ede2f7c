"""QMD's own model architectures, on tiny random-weight GGUFs built here with gguf-py
(tests/gguf_builders.py: Qwen3's tensor names, metadata, pooling and template; SmolLM2's
BPE tokenizer): each loads in the worker and answers through HTTP what llama.cpp itself
computes for it. Real Qwen3 weights are not on PyPI; the graphs and conventions are what the
real files have."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest

from npuserve.daemon.config import DEFAULT_INSTRUCTION, DEFAULT_RERANK_TEMPLATE

from .gguf_builders import LAST_POOLING, tiny_gemma_embedding, tiny_qwen3

LINE = re.compile(r"^(lex|vec|hyde): \S.*$")
DOCS = ["Cats sleep twelve to sixteen hours a day.", "The stock market fell sharply in 2008.",
        "Dogs enjoy playing fetch in the park."]


@pytest.fixture(scope="module")
def qwen3(models_dir: Path, tmp_path_factory) -> dict[str, Path]:
    src = models_dir / "SmolLM2-135M-Instruct.Q4_1.gguf"
    out = tmp_path_factory.mktemp("qwen3")
    return {"causal": tiny_qwen3(src, out / "tiny-qwen3.gguf"),
            "embedding": tiny_qwen3(src, out / "tiny-qwen3-embedding.gguf",
                                    pooling=LAST_POOLING)}


async def test_qwen3_embedding_pools_the_last_token_as_llama_cpp_does(make_client, qwen3):
    import llama_cpp

    client = await make_client(models__embed__path=str(qwen3["embedding"]))
    text = "Instruct: Given a web search query, retrieve relevant passages\nQuery: cats"
    resp = await client.post("/embed", json={"text": text})
    assert resp.status == 200
    got = np.array((await resp.json())["embedding"])
    llm = llama_cpp.Llama(str(qwen3["embedding"]), embedding=True, n_ctx=512, verbose=False)
    want = np.array(llm.embed(text))
    llm.close()
    assert got.shape == (64,) and abs(np.linalg.norm(got) - 1) < 1e-5
    assert float(got @ want / np.linalg.norm(want)) >= 0.999
    other = np.array((await (await client.post("/embed", json={"text": "dogs"})).json())
                     ["embedding"])
    assert float(got @ other) < 0.999  # the last token's state, not a constant


async def test_qwen3_reranker_scores_p_yes_of_its_template(make_client, qwen3):
    import llama_cpp

    client = await make_client(models__rerank__path=str(qwen3["causal"]),
                               models__expand__path=str(qwen3["causal"]))
    query = "how long do cats sleep"
    resp = await client.post("/rerank", json={"query": query, "documents": [
        {"file": f"{i}.md", "text": d} for i, d in enumerate(DOCS)]})
    assert resp.status == 200
    got = {r["index"]: r["score"] for r in (await resp.json())["results"]}
    llm = llama_cpp.Llama(str(qwen3["causal"]), n_ctx=2048, logits_all=True, verbose=False)
    yes, no = llm.tokenize(b"yes", add_bos=False)[0], llm.tokenize(b"no", add_bos=False)[0]
    for i, doc in enumerate(DOCS):
        prompt = (DEFAULT_RERANK_TEMPLATE.replace("{instruction}", DEFAULT_INSTRUCTION)
                  .replace("{query}", query).replace("{document}", doc))
        llm.reset()
        llm.eval(llm.tokenize(prompt.encode(), add_bos=False, special=True))
        logits = llm.scores[llm.n_tokens - 1]
        p_yes = 1.0 / (1.0 + math.exp(float(logits[no]) - float(logits[yes])))
        assert abs(got[i] - p_yes) < 0.01, (i, got[i], p_yes)
    llm.close()


async def test_qwen3_expansion_with_no_think_answers_lines_in_form(make_client, qwen3):
    client = await make_client(models__rerank__path=str(qwen3["causal"]),
                               models__expand__path=str(qwen3["causal"]),
                               models__expand__seed="5")
    lines = await (await client.post("/expand", json={"query": "cats sleep"})).json()
    assert lines and all(x["type"] in ("lex", "vec", "hyde") and x["text"] for x in lines)
    chat = await client.post("/v1/chat/completions", json={"messages": [
        {"role": "user", "content": "/no_think Expand this search query: cats sleep"}]})
    content = (await chat.json())["choices"][0]["message"]["content"]
    assert all(LINE.match(line) for line in content.splitlines() if line)
    # A plain chat goes through Qwen3's own template (ChatML): its prompt tokens are the
    # rendered conversation's.
    plain = await (await client.post("/v1/chat/completions", json={
        "messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": "Hello"}], "max_tokens": 4})).json()
    rendered = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n"
                "<|im_start|>assistant\n")
    count = await (await client.post("/tokenize", json={
        "model": "tiny-qwen3", "prompt": rendered, "add_special_tokens": False})).json()
    assert plain["usage"]["prompt_tokens"] == count["count"]


async def test_embeddinggemma_mean_pools_with_its_dense_projections(make_client,
                                                                      tmp_path_factory):
    """QMD's default embedding architecture (`gemma-embedding`): QMD's own query and document
    formats embedded as received, vectors as llama.cpp makes them."""
    import llama_cpp

    path = tiny_gemma_embedding(tmp_path_factory.mktemp("gemma") / "tiny-embeddinggemma.gguf")
    client = await make_client(models__embed__path=str(path))
    texts = ["task: search result | query: cats sleep", "title: Cats | text: cats sleep"]
    body = await (await client.post("/embed-batch", json={"texts": texts})).json()
    llm = llama_cpp.Llama(str(path), embedding=True, n_ctx=512, verbose=False)
    for item, text in zip(body, texts, strict=True):
        got, want = np.array(item["embedding"]), np.array(llm.embed(text))
        assert got.shape == (64,) and abs(np.linalg.norm(got) - 1) < 1e-5
        assert float(got @ want / np.linalg.norm(want)) >= 0.999
    llm.close()
    health = await (await client.get("/health")).json()
    assert health["models"]["embed"] == "tiny-embeddinggemma"
