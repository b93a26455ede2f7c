"""A cross-encoder reranker (BERT sequence classification, llama.cpp's rank pooling) as the
rerank model: recognised from its GGUF header, loaded in the worker, answering every rerank
shape through HTTP - with the scores llama.cpp itself gives for the same pairs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from .gguf_builders import cross_encoder_from

QUERY = "how long do cats sleep"
DOCS = ["Cats sleep twelve to sixteen hours a day.", "The stock market fell sharply in 2008.",
        "Dogs enjoy playing fetch in the park.", "cats " * 700]  # the last one is cut


@pytest.fixture(scope="module")
def cross_encoder(models_dir: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ce") / "minilm-cross-encoder.gguf"
    return cross_encoder_from(models_dir / "all-minilm-l6-v2-f16.gguf", out)


def llama_cpp_scores(path: Path, query: str, docs: list[str]) -> list[float]:
    """What llama.cpp gives for each pair: its own tokenizer makes [CLS] q [SEP] d [SEP]
    from the text (special tokens parsed), its own batch and context run it, rank pooling."""
    import llama_cpp

    llm = llama_cpp.Llama(str(path), embedding=True, n_ctx=512, verbose=False, flash_attn=True,
                          pooling_type=llama_cpp.LLAMA_POOLING_TYPE_RANK)
    scores = []
    for doc in docs:
        toks = llm.tokenize(f"{query}[SEP]{doc}".encode(), add_bos=True, special=True)
        if len(toks) > 512:
            toks = toks[:511] + toks[-1:]
        llm.reset()
        llm._batch.reset()
        llm._batch.add_sequence(toks, 0, True)
        llm._ctx.decode(llm._batch)
        logit = llama_cpp.llama_get_embeddings_seq(llm._ctx.ctx, 0)[0]
        scores.append(1.0 / (1.0 + math.exp(-logit)))
    llm.close()
    return scores


async def test_a_cross_encoder_reranks_with_llama_cpps_own_scores(make_client, cross_encoder):
    client = await make_client(models__rerank__path=str(cross_encoder),
                               models__rerank__n_ctx="512")
    listing = await (await client.get("/admin/models")).json()
    kinds = {m["name"]: m["kind"] for m in listing["models"]}
    assert kinds["minilm-cross-encoder"] == "llama_cpp_cross_encoder"
    resp = await client.post("/rerank", json={"query": QUERY, "documents": [
        {"file": f"{i}.md", "text": d} for i, d in enumerate(DOCS)]})
    assert resp.status == 200
    results = (await resp.json())["results"]
    got = {r["index"]: r["score"] for r in results}
    assert [r["truncated"] for r in sorted(results, key=lambda r: r["index"])] == [
        False, False, False, True]
    expected = llama_cpp_scores(cross_encoder, QUERY, DOCS)
    for i, score in enumerate(expected):
        assert abs(got[i] - score) < 1e-4, (i, got[i], score)
    cohere = await (await client.post("/v1/rerank", json={"query": QUERY,
                                                          "documents": DOCS})).json()
    assert {r["index"]: r["relevance_score"] for r in cohere["results"]} == got
    # Expansion still runs on its own (generative) model.
    assert (await client.post("/expand", json={"query": "cats"})).status == 200
