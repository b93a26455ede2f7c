"""The OpenAPI 3.0 document of the whole HTTP API, served at /openapi.json.

Written out here rather than derived from the handlers (they validate by hand, for clear
error messages); a test checks that every route the app registers is described, so the
two cannot drift apart silently. The fuzzer (schemathesis) reads this document.
"""

from __future__ import annotations

from typing import Any

from npuserve.daemon.http.validation import Limits
from npuserve.daemon.version import VERSION

Schema = dict[str, Any]

STR: Schema = {"type": "string", "minLength": 1}
ANY_STR: Schema = {"type": "string"}
BOOL: Schema = {"type": "boolean"}
ERROR: Schema = {"type": "object", "required": ["error"],
                 "properties": {"error": {"type": "string"}}}
VECTOR: Schema = {"type": "array", "items": {"type": "number"}}
IGNORED: Schema = {"description": "accepted for compatibility and ignored: the daemon serves"
                   " its configured model"}
LIMIT: Schema = {"type": "integer", "minimum": 1, "maximum": 1000}


def obj(required: list[str] | None = None, **props: Schema) -> Schema:
    """An object; optional members may be null (clients send null for "not set", and the
    daemon treats it so)."""
    required = required or []
    members = {k: v if k in required or not v else {**v, "nullable": True}
               for k, v in props.items()}
    out: Schema = {"type": "object", "properties": members}
    if required:
        out["required"] = required
    return out


def arr(items: Schema, lim: Limits, min_items: int = 1) -> Schema:
    return {"type": "array", "items": items, "minItems": min_items, "maxItems": lim.max_batch}


def text(lim: Limits, min_length: int = 1) -> Schema:
    return {"type": "string", "minLength": min_length, "maxLength": lim.max_text_chars}


def op(summary: str, tag: str, body: Schema | None = None, ok: Schema | None = None,
       params: list[dict[str, Any]] | None = None, ok_status: str = "200",
       more_ok: tuple[str, ...] = (), stream: str | None = None) -> dict[str, Any]:
    """One operation. Every error is `{"error": ...}` JSON, whatever its status: 400 bad
    input, 401 key, 404, 405, 409, 413 too large, 503 overload/unavailable (with
    Retry-After), 504 deadline — documented together as the default response."""
    responses: dict[str, Any] = {ok_status: {"description": "success", "content": {
        "application/json": {"schema": ok or {}}}}}
    if stream:  # the same status streamed (SSE or NDJSON), when the request asks
        responses[ok_status]["content"][stream] = {"schema": {}}
    for status in more_ok:
        responses[status] = {"description": "success", "content": {
            "application/json": {"schema": ok or {}}}}
    responses["default"] = {"description": "error", "content": {
        "application/json": {"schema": ERROR}}}
    out: dict[str, Any] = {"summary": summary, "tags": [tag], "responses": responses}
    if body is not None:
        out["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    if params:
        out["parameters"] = params
    return out


def path_param(name: str, pattern: str | None = None) -> dict[str, Any]:
    schema: Schema = {"type": "string", "minLength": 1}
    if pattern:
        schema["pattern"] = pattern
    return {"name": name, "in": "path", "required": True, "schema": schema}


def query_param(name: str, schema: Schema, required: bool = False) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": required, "schema": schema}


COLLECTION = "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
COLLECTION_OR_ALL = "^$|" + COLLECTION  # empty: every collection
COLLECTION_Q = query_param("collection", {"type": "string", "pattern": COLLECTION_OR_ALL})


def _qmd(lim: Limits) -> dict[str, Any]:
    qmd_doc = obj(["file", "text"], file=ANY_STR, text=text(lim, 0), title=ANY_STR)
    cohere_doc: Schema = {"anyOf": [text(lim, 0), obj(["text"], text=text(lim, 0))]}
    embedding = obj(embedding=VECTOR, model=ANY_STR, truncated=BOOL)
    tokenize_body: Schema = {"anyOf": [
        obj(["text"], text=text(lim)),
        obj(["prompt"], prompt=text(lim), model=ANY_STR, add_special_tokens=BOOL)]}
    return {
        "/embed": {"post": op("Embed one text (QMD)", "qmd", obj(
            ["text"], text=text(lim),
            options=obj(model=ANY_STR, title=ANY_STR, isQuery=BOOL)), embedding)},
        "/embed-batch": {"post": op("Embed texts; empty strings answer null (QMD)", "qmd",
                                    obj(["texts"], texts=arr(text(lim, 0), lim),
                                        options=obj(model=ANY_STR, title=ANY_STR,
                                                    isQuery=BOOL)),
                                    {"type": "array", "items": {}})},
        "/rerank": {"post": op(
            "Logit rerank: QMD {file,text} documents, or Cohere/Jina/TEI shapes", "qmd",
            {"anyOf": [obj(["query", "documents"], query=text(lim),
                           documents=arr(qmd_doc, lim)),
                       obj(["query", "documents"], query=text(lim),
                           documents=arr(cohere_doc, lim), top_n=top_n(lim),
                           return_documents=BOOL, model=IGNORED),
                       obj(["query", "texts"], query=text(lim),
                           texts=arr(text(lim, 0), lim))]})},
        "/expand": {"post": op("Query expansion into lex/vec/hyde lines (QMD)", "qmd", obj(
            ["query"], query=text(lim),
            options=obj(intent=ANY_STR, context=ANY_STR, includeLexical=BOOL)),
            {"type": "array", "items": obj(type=ANY_STR, text=ANY_STR)})},
        "/tokenize": {"post": op(
            "QMD {text} -> {tokens: count}; vLLM {prompt} -> {tokens: [ids], count}", "qmd",
            tokenize_body, obj(tokens={}))},
        "/v1/tokenize": {"post": op("Tokenize (QMD or vLLM shape, as /tokenize)", "qmd",
                                    tokenize_body, obj(tokens={}))},
    }


def top_n(lim: Limits) -> Schema:
    return {"type": "integer", "minimum": 1, "maximum": lim.max_batch}


def _conventions(lim: Limits) -> dict[str, Any]:
    embed_input: Schema = {"anyOf": [text(lim), arr(text(lim), lim)]}
    cohere_doc: Schema = {"anyOf": [text(lim, 0), obj(["text"], text=text(lim, 0))]}
    message = obj(["role", "content"], role={"type": "string", "enum": [
        "system", "user", "assistant", "tool", "developer"]}, content=ANY_STR)
    stop: Schema = {"anyOf": [STR, {"type": "array", "items": STR, "maxItems": 4}]}
    sampling: dict[str, Schema] = {
        "model": IGNORED, "stream": BOOL, "max_tokens": {"type": "integer", "minimum": 1},
        "max_completion_tokens": {"type": "integer", "minimum": 1},
        "temperature": {"type": "number", "minimum": 0, "maximum": 2},
        "top_p": {"type": "number", "minimum": 0, "maximum": 1},
        "top_k": {"type": "integer", "minimum": 0, "maximum": 1000},
        "seed": {"type": "integer"}, "stop": stop,
        "n": {"type": "integer", "minimum": 1, "maximum": 1},
        "grammar": ANY_STR, "response_format": {"type": "object"},
        "stream_options": obj(include_usage=BOOL)}
    ollama_opts: dict[str, Schema] = {
        "model": IGNORED, "stream": BOOL, "format": {"anyOf": [
            {"type": "string", "enum": ["json"]}, {"type": "object"}]},
        "options": obj(num_predict={"type": "integer", "minimum": 1},
                       temperature={"type": "number", "minimum": 0, "maximum": 2},
                       top_p={"type": "number", "minimum": 0, "maximum": 1},
                       top_k={"type": "integer", "minimum": 0, "maximum": 1000},
                       seed={"type": "integer"}, stop=stop)}
    score_body = obj(["text_1", "text_2"], text_1=text(lim),
                     text_2={"anyOf": [text(lim, 0), arr(text(lim, 0), lim)]}, model=IGNORED)
    score_ok = obj(data={"type": "array", "items": obj(
        ["index", "score"], index={"type": "integer"}, score={"type": "number"})})
    return {
        "/v1/embeddings": {"post": op("OpenAI embeddings", "openai", obj(
            ["input"], input=embed_input, model=ANY_STR,
            encoding_format={"type": "string", "enum": ["float", "base64"]},
            dimensions={"type": "integer", "description": "must equal the model's dimension"},
            user=IGNORED),
            obj(object=ANY_STR, data={"type": "array"}, model=ANY_STR))},
        "/v1/models": {"get": op("Models (OpenAI list)", "openai")},
        "/v1/rerank": {"post": op("Cohere/Jina rerank", "rerank", obj(
            ["query", "documents"], query=text(lim), documents=arr(cohere_doc, lim),
            top_n=top_n(lim), return_documents=BOOL, model=IGNORED),
            obj(results={"type": "array"}))},
        "/v2/rerank": {"post": op("Cohere v2 rerank", "rerank", obj(
            ["query", "documents"], query=text(lim), documents=arr(cohere_doc, lim),
            top_n=top_n(lim), return_documents=BOOL, model=IGNORED),
            obj(results={"type": "array"}))},
        "/api/rerank": {"post": op("Ollama-style rerank (rkllama)", "rerank", obj(
            ["query", "documents"], query=text(lim), documents=arr(cohere_doc, lim),
            top_n=top_n(lim), model=IGNORED),
            obj(results={"type": "array"}))},
        "/score": {"post": op("vLLM score: text_1 against each of text_2", "rerank",
                              score_body, score_ok)},
        "/v1/score": {"post": op("vLLM score (OpenAI-style path)", "rerank",
                                 score_body, score_ok)},
        "/v1/chat/completions": {"post": op(
            "OpenAI chat completion on the expansion model (stream: server-sent events)",
            "openai", obj(["messages"], messages=arr(message, lim), **sampling),
            obj(choices={"type": "array"}), stream="text/event-stream")},
        "/v1/completions": {"post": op(
            "OpenAI text completion on the expansion model (stream: server-sent events)",
            "openai", obj(["prompt"], prompt={"anyOf": [text(lim), arr(text(lim), lim)]},
                          **sampling), obj(choices={"type": "array"}),
            stream="text/event-stream")},
        "/api/generate": {"post": op(
            "Ollama generate on the expansion model (stream, the default: NDJSON)", "ollama",
            obj(["prompt"], prompt=text(lim), system=ANY_STR, raw=BOOL, **ollama_opts),
            stream="application/x-ndjson")},
        "/api/chat": {"post": op(
            "Ollama chat on the expansion model (stream, the default: NDJSON)", "ollama",
            obj(["messages"], messages=arr(message, lim), **ollama_opts),
            stream="application/x-ndjson")},
        "/v2/embed": {"post": op("Cohere v2 embed", "embed", obj(
            ["texts"], texts=arr(text(lim), lim), model=IGNORED, input_type=ANY_STR,
            embedding_types={"type": "array", "items": {"type": "string", "enum": ["float"]}}),
            obj(embeddings={"type": "object"}))},
        "/pooling": {"post": op("vLLM pooling (embeddings)", "embed", obj(
            ["input"], input=embed_input, model=IGNORED), obj(data={"type": "array"}))},
        "/api/embed": {"post": op("Ollama embed", "ollama", obj(
            ["input"], input=embed_input, model=IGNORED, truncate=BOOL),
            obj(embeddings={"type": "array", "items": VECTOR}))},
        "/api/embeddings": {"post": op("Ollama legacy single-prompt embedding", "ollama",
                                       obj(["prompt"], prompt=text(lim), model=IGNORED),
                                       obj(embedding=VECTOR))},
        "/api/tags": {"get": op("Ollama: models on disk", "ollama")},
        "/api/ps": {"get": op("Ollama: models loaded now", "ollama")},
        "/api/version": {"get": op("Ollama: version", "ollama")},
    }


def _index(lim: Limits) -> dict[str, Any]:
    name, doc_path = path_param("name", COLLECTION), path_param("path")
    doc = obj(["path", "body"], path=STR, body=text(lim), title=ANY_STR,
              metadata={"type": "object"})
    collection = {"type": "string", "pattern": COLLECTION_OR_ALL}
    return {
        "/collections": {
            "get": op("List collections", "index"),
            "post": op("Create a collection", "index", obj(
                ["name"], name={"type": "string", "pattern": COLLECTION}, path=ANY_STR,
                pattern=ANY_STR, includeByDefault=BOOL), ok_status="201", more_ok=("200",)),
        },
        "/collections/{name}": {"delete": op("Delete a collection and its documents",
                                             "index", params=[name])},
        "/collections/{name}/documents": {"post": op(
            "Add or replace documents (distinct paths), all or nothing", "index",
            obj(["documents"], documents=arr(doc, lim)), params=[name])},
        "/collections/{name}/documents/{path}": {
            "get": op("One document", "index", params=[name, doc_path]),
            "put": op("Add or replace one document", "index",
                      obj(["body"], body=text(lim), title=ANY_STR, metadata={"type": "object"}),
                      params=[name, doc_path], ok_status="201", more_ok=("200",)),
            "delete": op("Delete one document", "index", params=[name, doc_path]),
        },
        "/search": {"get": op("BM25 search", "index", params=[
            query_param("q", STR, required=True), query_param("limit", LIMIT), COLLECTION_Q,
            query_param("full", {"type": "string", "enum": ["true", "false", "1", "0"]})])},
        "/vsearch": {"post": op("Vector search", "index", obj(
            ["query"], query=text(lim), limit=LIMIT, collection=collection, full=BOOL))},
        "/query": {"post": op("Hybrid search: expand, fuse, rerank", "index", obj(
            ["query"], query=text(lim), limit=LIMIT, collection=collection, intent=ANY_STR,
            full=BOOL))},
        "/browse": {"get": op("Page through chunks", "index", params=[
            query_param("limit", LIMIT), query_param("offset", {"type": "integer", "minimum": 0,
                                                                "maximum": 1 << 40}),
            COLLECTION_Q])},
        "/status": {"get": op("Index and runtime status", "index")},
    }


def _ops() -> dict[str, Any]:
    model = path_param("name")
    return {
        "/health": {"get": op("Liveness and readiness; 503 says why (no key needed)", "ops")},
        "/metrics": {"get": {"summary": "Prometheus metrics", "tags": ["ops"], "responses": {
            "200": {"description": "text exposition format",
                    "content": {"text/plain": {"schema": ANY_STR}}},
            "default": {"description": "error",
                        "content": {"application/json": {"schema": ERROR}}}}}},
        "/openapi.json": {"get": op("This document", "ops")},
        "/admin/models": {"get": op("Models, devices, queues, calibration", "admin")},
        "/admin/models/{name}/load": {"post": op("Preload a model", "admin", params=[model])},
        "/admin/models/{name}/unload": {"post": op("Unload a model", "admin", params=[model])},
    }


def openapi_document(lim: Limits) -> dict[str, Any]:
    """The document for a daemon with these limits (array and string bounds are its own)."""
    return {
        "openapi": "3.0.3",
        "info": {"title": "npuserve", "version": VERSION, "description": (
            "LAN model server for retrieval: embeddings, logit rerank, query expansion and a "
            "document index. With server.api_key set, every path but /health and "
            "/openapi.json needs `Authorization: Bearer <key>`.")},
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "paths": {**_qmd(lim), **_conventions(lim), **_index(lim), **_ops()},
    }
