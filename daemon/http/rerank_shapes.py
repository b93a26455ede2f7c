"""Rerank in the shapes other clients send, one implementation behind them all.

Cohere v1/v2, Jina, Ollama-style (rkllama's /api/rerank):
  {model?, query, documents: [str | {text}], top_n?, return_documents?}
  -> {results: [{index, relevance_score, score, document?: {text}}], model, usage}
TEI: {query, texts: [str]} -> [{index, score, relevance_score}]
vLLM score: {model?, text_1: str, text_2: str | [str]}
  -> {id, object: "list", data: [{index, object: "score", score}], model, usage}
Every result carries both `relevance_score` and `score`: clients read one or the other.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from aiohttp import web

from npuserve.daemon.http.model_names import check_model
from npuserve.daemon.http.services import services, timing_headers
from npuserve.daemon.http.validation import (
    InvalidRequest,
    check_count,
    check_length,
    optional_bool,
    optional_int,
    read_object,
    string_list,
    text_field,
)

routes = web.RouteTableDef()


def is_qmd_rerank(body: dict[str, Any]) -> bool:
    """QMD documents are objects that carry `file`; anything else is another client's shape."""
    docs = body.get("documents")
    if "texts" in body and docs is None:
        return False
    if not isinstance(docs, list) or not docs:
        return True  # let the QMD path report its own validation message
    return all(isinstance(d, dict) and "file" in d for d in docs)


def _document_texts(docs: Any, limits: Any) -> list[str]:
    if not isinstance(docs, list) or not docs:
        raise InvalidRequest("documents must be a non-empty array of strings or {text} objects")
    check_count("documents", len(docs), limits)
    texts: list[str] = []
    for i, doc in enumerate(docs):
        if isinstance(doc, dict):
            doc = doc.get("text")
        if not isinstance(doc, str):
            raise InvalidRequest(f"documents[{i}] must be a string or an object with text")
        check_length(f"documents[{i}]", doc, limits)
        texts.append(doc)
    return texts


async def cohere_or_tei_rerank(request: web.Request, body: dict[str, Any]) -> web.Response:
    svc = services(request)
    check_model(request, "rerank", body.get("model"))
    query = text_field(body, "query", svc.limits)
    if "texts" in body and "documents" not in body:
        texts = string_list(body, "texts", svc.limits, allow_empty_items=True)
        tei = await svc.scheduler.rerank(query, texts)
        ranked = sorted(range(len(texts)), key=lambda i: tei.scores[i], reverse=True)
        return web.json_response([{"index": i, "score": tei.scores[i],
                                   "relevance_score": tei.scores[i]} for i in ranked],
                                 headers=timing_headers(tei.timing))
    texts = _document_texts(body.get("documents"), svc.limits)
    top_n = optional_int(body, "top_n", 1, svc.limits.max_batch) or len(texts)
    return_documents = optional_bool(body, "return_documents", False)
    result = await svc.scheduler.rerank(query, texts)
    scores = result.scores
    ranked = sorted(range(len(texts)), key=lambda i: scores[i], reverse=True)[:top_n]
    results: list[dict[str, Any]] = []
    for i in ranked:
        item: dict[str, Any] = {"index": i, "relevance_score": scores[i], "score": scores[i]}
        if return_documents:
            item["document"] = {"text": texts[i]}
        results.append(item)
    return web.json_response(
        {"results": results, "model": result.model,
         "usage": {"total_tokens": result.tokens},
         "meta": {"truncated": [i for i in ranked if result.truncated[i]]}},
        headers=timing_headers(result.timing),
    )


@routes.post("/v1/rerank")
async def v1_rerank(request: web.Request) -> web.Response:
    return await cohere_or_tei_rerank(request, await read_object(request))


@routes.post("/v2/rerank")
async def v2_rerank(request: web.Request) -> web.Response:
    """Cohere v2 (QMD's cohere_v2_rerank client tries /rerank, /v1/rerank, /v2/rerank)."""
    return await cohere_or_tei_rerank(request, await read_object(request))


@routes.post("/api/rerank")
async def ollama_rerank(request: web.Request) -> web.Response:
    """The Ollama-style rerank of rkllama and QMD's Ollama clients."""
    return await cohere_or_tei_rerank(request, await read_object(request))


@routes.post("/score")
@routes.post("/v1/score")
async def vllm_score(request: web.Request) -> web.Response:
    """vLLM's score API: text_1 (the query) scored against each of text_2."""
    svc = services(request)
    body = await read_object(request)
    check_model(request, "rerank", body.get("model"))
    query = text_field(body, "text_1", svc.limits, "text_1 must be a non-empty string (the query)")
    second = body.get("text_2")
    texts = [second] if isinstance(second, str) else second
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise InvalidRequest("text_2 must be a string or a non-empty array of strings")
    check_count("text_2", len(texts), svc.limits)
    for i, text in enumerate(texts):
        check_length(f"text_2[{i}]", text, svc.limits)
    result = await svc.scheduler.rerank(query, texts)
    data = [{"index": i, "object": "score", "score": s} for i, s in enumerate(result.scores)]
    return web.json_response(
        {"id": f"score-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
         "model": result.model, "data": data,
         "usage": {"prompt_tokens": result.tokens, "total_tokens": result.tokens}},
        headers=timing_headers(result.timing))
