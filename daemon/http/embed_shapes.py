"""Embeddings in the shapes QMD's #720 client also speaks: Cohere v2 and vLLM's pooling API.

Cohere v2: {model, texts: [str], input_type, embedding_types?: ["float"]}
  -> {id, embeddings: {float: [[...]]}, texts, meta, response_type: "embeddings_by_type"}
vLLM: {model, input: str | [str]} -> {id, object: "list", data: [{index, object: "pooling",
  data: [...]}], model, usage}
Texts are embedded as received (QMD's clients format them), as on every embedding path.
"""

from __future__ import annotations

import time
import uuid

from aiohttp import web

from npuserve.daemon.http.model_names import check_model
from npuserve.daemon.http.routes_openai import embedding_inputs
from npuserve.daemon.http.services import embedding_headers, services
from npuserve.daemon.http.validation import InvalidRequest, read_object

routes = web.RouteTableDef()
INPUT_TYPES = ("search_query", "search_document", "classification", "clustering", "image")


@routes.post("/v2/embed")
async def cohere_embed(request: web.Request) -> web.Response:
    svc = services(request)
    body = await read_object(request)
    check_model(request, "embed", body.get("model"))
    texts = embedding_inputs(body.get("texts"), svc.limits, "texts")
    kind = body.get("input_type")
    if kind is not None and kind not in INPUT_TYPES:
        raise InvalidRequest(f"input_type must be one of {', '.join(INPUT_TYPES)}")
    types = body.get("embedding_types")
    if types is not None and types != ["float"]:
        raise InvalidRequest('embedding_types: only ["float"] is served')
    result = await svc.scheduler.embed(texts)
    return web.json_response(
        {"id": str(uuid.uuid4()), "response_type": "embeddings_by_type",
         "embeddings": {"float": result.vectors.tolist()}, "texts": texts,
         "meta": {"api_version": {"version": "2"},
                  "billed_units": {"input_tokens": result.tokens}},
         "model": result.model, "fingerprint": result.fingerprint},
        headers=embedding_headers(result.timing, result.fingerprint))


@routes.post("/pooling")
async def vllm_pooling(request: web.Request) -> web.Response:
    svc = services(request)
    body = await read_object(request)
    check_model(request, "embed", body.get("model"))
    texts = embedding_inputs(body.get("input"), svc.limits)
    result = await svc.scheduler.embed(texts)
    data = [{"index": i, "object": "pooling", "data": result.vectors[i].tolist()}
            for i in range(len(texts))]
    return web.json_response(
        {"id": f"pool-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
         "model": result.model, "data": data, "fingerprint": result.fingerprint,
         "usage": {"prompt_tokens": result.tokens, "total_tokens": result.tokens}},
        headers=embedding_headers(result.timing, result.fingerprint))
